"""Sampling of measured data: the server's q grid leaves no empty voxel between measured points (the
empty planes of the old grid were read by the classifier as structure), on synthetic oblique geometries
and on the measured 34-ID-C scan."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from defectscope.preprocessing.orthonormalise import Orthonormaliser
from defectscope.preprocessing.qspace import Grid, canonical_frame, natural_grid

from conftest import SHARED_DATA as SHARED
from test_orthonormalise import synthetic_geometry


def empty_inside(ortho: Orthonormaliser, geometry, grid: Grid) -> float:
    """Fraction of the voxels inside the measured region (its closing by two voxels, away from the grid's
    faces) that no measured point falls in."""
    mapping = ortho.mapping(geometry, grid=grid)
    touched = np.zeros(grid.n_voxels, bool)
    touched[mapping.touched] = True
    touched = touched.reshape(grid.shape)
    pad = 4
    region = ndimage.binary_closing(np.pad(touched, pad), structure=np.ones((3, 3, 3)), iterations=2)
    region = ndimage.binary_erosion(region, iterations=2)[pad:-pad, pad:-pad, pad:-pad]
    return float((region & ~touched).sum() / max(1, region.sum()))


def finer(grid: Grid, voxel: float, most: int = 160) -> Grid:
    """The same region (its central ``most`` voxels per axis at most) at another voxel size."""
    centre = np.array(grid.origin) + (np.array(grid.shape) - 1) / 2 * grid.voxel_size
    shape = tuple(min(most, int(np.ceil((n - 1) * grid.voxel_size / voxel)) + 1) for n in grid.shape)
    return Grid(shape=shape, origin=tuple(centre - (np.array(shape) - 1) / 2 * voxel), voxel_size=voxel)


@pytest.mark.parametrize("angles", [{}, {"delta": 45.0, "gamma": 20.0}, {"chi": 70.0, "delta": 25.0}])
def test_natural_grid_has_no_empty_voxel_between_measured_points(angles):
    geometry = synthetic_geometry(**angles)
    grid = natural_grid(geometry)
    ortho = Orthonormaliser()
    assert empty_inside(ortho, geometry, grid) == 0.0


def test_the_longest_step_as_voxel_leaves_empty_planes_on_an_oblique_lattice(shared_data):
    """What the grid used to be (the longest of the row, column and frame steps) on the measured scan."""
    from defectscope.server.demo import load_measured_scan
    from defectscope.preprocessing.geometry import geometry_from_dict
    from defectscope.preprocessing.qspace import pixel_q_lab

    frames, geometry, _ = load_measured_scan()
    geometry = geometry_from_dict(geometry, n_frames=len(frames), frame_shape=frames.shape[1:])
    frame = canonical_frame(geometry)
    rows, cols = geometry.frame_shape
    mid = (geometry.n_frames - 1) // 2
    q = pixel_q_lab(geometry, [mid, mid + 1], roi=[rows // 2, rows // 2 + 2, cols // 2, cols // 2 + 2])
    longest = max(np.linalg.norm(q[0, 1, 0] - q[0, 0, 0]), np.linalg.norm(q[0, 0, 1] - q[0, 0, 0]),
                  np.linalg.norm(q[1, 0, 0] - q[0, 0, 0]))
    assert frame.natural_voxel > 1.2 * longest  # the lattice is oblique: the covering voxel is larger
    grid = natural_grid(geometry)
    ortho = Orthonormaliser()
    assert empty_inside(ortho, geometry, grid) < 1e-3  # masked pixels only
    assert empty_inside(ortho, geometry, finer(grid, longest)) > 0.05


# -- what a reply says about the sampling ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import resolve_model

    return {name: Predictor(resolve_model(name), provider="cpu") for name in ("defectscope-3class", "defectscope-2class")}


@pytest.fixture(scope="module")
def examples():
    """Simulated maps (the demo's simulator, seed 7): defect-free, then screws, then edges, 4 of each."""
    from defectscope.server.demo import make_examples

    maps, rows, _ = make_examples(n_per_class=4, seed=7)
    return [(np.asarray(m, np.float32), row) for m, row in zip(maps, rows)]


def classify_map(classifier, volume, voxel=None) -> dict:
    from defectscope.server.protocol import Request

    spec = {"axes": ["q_par", "q_perp1", "q_perp2"], "voxel_size": voxel}
    return classifier.classify(Request("classify", "t", {}, kind="map", array=volume, spec=spec)).reply


def reasons(reply) -> list[str]:
    return [w["reason"] for w in reply["warnings"]]


def test_crystal_extent_follows_from_the_oversampling_and_voxel_size():
    from defectscope.preprocessing.config import PipelineConfig
    from defectscope.preprocessing.pipeline import prepare

    from test_oversampling import crystal

    volume, true = crystal("ellipsoid", 3.0)  # the central peak reads a rounded crystal to within ~10 %
    voxel = [2e-3, 2e-3, 2e-3]
    report = prepare(volume * 100, PipelineConfig(), voxel_size=voxel).report
    expected = 2 * np.pi / (true * 2e-3) / 10  # nm
    np.testing.assert_allclose(report["crystal_extent_nm"], expected, rtol=0.12)
    assert report["oversampling_resolved"] == [True, True, True]
    assert prepare(volume * 100, PipelineConfig()).report["crystal_extent_nm"] is None  # no voxel size, no nm


def test_stable_answers_pass_the_sampling_check(bundled, examples):
    """Centred dislocations and defect-free crystals: the same label across the trained range."""
    from defectscope.server.core import Classifier

    classifier = Classifier(bundled["defectscope-3class"], overlap=False)
    for volume, row in examples:
        if row["position"] == "RPD":
            continue
        reply = classify_map(classifier, volume)
        check = reply["preparation"]["sampling_check"]
        assert check["oversampling"] == [2.3, 3.0, 3.7] and len(check["probabilities"]) == 3
        assert set(check["labels"]) == {reply["label"]} == {row["label"]}, (row, check)
        assert "SAMPLING_SENSITIVE" not in reasons(reply)


def test_an_answer_that_changes_with_the_sampling_is_flagged(bundled, examples):
    """The examples as simulated, and summed 3 x 3 x 3 (a grid three times coarser, under-sampled: there the
    answer changes across the trained range). A reply whose label is not the same at every sampling says
    it is not reliable."""
    from defectscope.server.core import Classifier
    from defectscope.training.invariance import binned

    classifier = Classifier(bundled["defectscope-3class"], overlap=False)
    flagged = []
    for volume, row in [*examples, *((binned(v, 3), r) for v, r in examples)]:
        reply = classify_map(classifier, volume)
        check = reply["preparation"]["sampling_check"]
        native = list(reply["classes"])[int(np.argmax(check["native_probabilities"]))]
        labels = [native, *check["labels"]]  # the answer is their mean (the models' rule: sampling_mean)
        assert ("SAMPLING_SENSITIVE" in reasons(reply)) == any(lab != reply["label"] for lab in labels)
        flagged.append("SAMPLING_SENSITIVE" in reasons(reply))
    assert any(flagged) and not all(flagged)
    off = Classifier(bundled["defectscope-3class"], overlap=False, sampling_check=False)
    reply = classify_map(off, examples[0][0])
    assert "sampling_check" not in reply["preparation"] and "sampling_check" not in reply["timings_ms"]


def test_models_that_disagree_are_said_to(bundled, examples):
    """With the other bundled model as cross-check, every reply carries its probabilities, and
    MODELS_DISAGREE exactly where the two P(defective) differ by more than 0.3."""
    from defectscope.server.core import DISAGREEMENT, Classifier

    three, two = bundled["defectscope-3class"], bundled["defectscope-2class"]
    classifier = Classifier(three, overlap=False, cross_check=two)
    for volume, _ in examples:
        reply = classify_map(classifier, volume)
        cross = reply["preparation"]["cross_check"]
        assert cross["model"] == two.describe() and cross["classes"] == list(two.classes)
        gap = abs((1 - reply["probabilities"][0]) - cross["probabilities"][1])
        assert ("MODELS_DISAGREE" in reasons(reply)) == (gap > DISAGREEMENT + 1e-3) or abs(gap - DISAGREEMENT) < 1e-3


def test_cross_check_needs_the_same_preparation(bundled, tmp_path):
    from defectscope.model.fixture import build_fixture_model
    from defectscope.model.predictor import Predictor
    from defectscope.preprocessing.config import PipelineConfig
    from defectscope.server.core import Classifier

    other = Predictor(build_fixture_model(tmp_path / "small.onnx", pipeline=PipelineConfig(shape=(32, 32, 32))))
    with pytest.raises(ValueError, match="pipeline"):
        Classifier(bundled["defectscope-3class"], cross_check=other)


@pytest.fixture(scope="module")
def measured_scan(shared_data):
    from defectscope.server.demo import load_measured_scan

    return load_measured_scan()


def test_measured_scan_reply_says_what_is_uncertain(bundled, measured_scan):
    """The 34-ID-C scan through the server's own gridding: its extent in nm per axis (an independent phase
    retrieval puts this crystal at roughly 300-400 nm), determined with confidence, and, where the two models
    contradict each other on it, the warning that says so."""
    from defectscope.server.core import Classifier
    from defectscope.server.protocol import Request

    frames, geometry, mask = measured_scan
    classifier = Classifier(bundled["defectscope-3class"], overlap=False, cross_check=bundled["defectscope-2class"])
    reply = classifier.classify(Request("classify", "s54", {}, kind="scan", array=frames, mask=mask,
                                        spec={"geometry": geometry})).reply
    prep = reply["preparation"]
    assert len(prep["crystal_extent_nm"]) == 3 and all(250 < e < 450 for e in prep["crystal_extent_nm"])
    assert prep["oversampling_confidence"] == ["high"] * 3 and "SAMPLING_UNDETERMINED" not in reasons(reply)
    other = Classifier(bundled["defectscope-2class"], overlap=False).classify(
        Request("classify", "s54", {}, kind="scan", array=frames, mask=mask, spec={"geometry": geometry})).reply
    if (reply["label"] == "defect_free") != (other["label"] == "defect_free"):
        assert "MODELS_DISAGREE" in reasons(reply)


# -- the invariance table (python -m defectscope.training.invariance), as a property ---------------------
@pytest.fixture(scope="module")
def invariance():
    from defectscope.training import invariance

    return invariance.run(["defectscope-3class", "defectscope-2class"])


def test_no_two_unflagged_answers_contradict_each_other(invariance):
    """Across 1x/2x/3x gridding or binning, crops and gap masks of each dataset (measured ones when
    ../shared/data is there), and across both models: the answers given without a warning that they are
    unreliable never say defect-free for one variant and defective for another."""
    from defectscope.training.invariance import UNRELIABLE

    assert {"cdinn", "aps34idc", "sixs"} <= set(invariance["datasets"]) or not (SHARED.is_dir())
    for name, entry in invariance["datasets"].items():
        assert entry["honest"], (name, {v: {m: (r.get("label"), [w for w in r.get("warnings", []) if w in UNRELIABLE])
                                            for m, r in by.items()} for v, by in entry["variants"].items()})


def test_crops_around_the_peak_change_nothing(invariance):
    for name, entry in invariance["datasets"].items():
        variants = entry["variants"]
        base = variants.get(f"{name} gridded x1") or variants["x1"]
        for variant, by_model in variants.items():
            if "crop" in variant and "crop 48" not in variant:  # crops that hold the model's window and margin
                for m, r in by_model.items():
                    assert r["probabilities"] == pytest.approx(base[m]["probabilities"], abs=1e-3), (name, variant, m)


def test_chip_gaps_off_the_peak_change_no_answer(invariance):
    """A measured scan sent raw with detector chip gaps where a beamline has them (off the peak; its outer
    fringes cross them) is answered as without them: same label, probabilities within 0.1, by both models.
    (Gaps through the peak's core remove it, and are warned PEAK_NEAR_EDGE instead: tests/test_cut.py.)"""
    from defectscope.training.invariance import GAP_OFFSET

    checked = 0
    for name, entry in invariance["datasets"].items():
        gapped = entry["variants"].get(f"{name} sent raw, chip gaps {GAP_OFFSET} pixels from the peak")
        if gapped is None:
            continue
        for m, r in gapped.items():
            raw = entry["variants"][f"{name} sent raw"][m]
            assert r["label"] == raw["label"], (name, m)
            assert r["probabilities"] == pytest.approx(raw["probabilities"], abs=0.1), (name, m)
            checked += 1
    assert checked or not SHARED.is_dir()


def test_the_34idc_scan_gets_one_answer_on_every_grid_crop_and_gap_mask(invariance):
    """The invariance the sampling issue asks for, on the measured 34-ID-C scan with the bundled models: one label
    and class probabilities within 0.1 across gridding at 1x/2x/3x, a half-voxel shift, crops, the raw scan sent
    with its own mask and with chip gaps off the peak. The variant whose gaps cross the peak's core is left out:
    its data stop next to the peak, and its answer is warned PEAK_NEAR_EDGE and uncertain instead."""
    entry = invariance["datasets"].get("aps34idc")
    if entry is None:
        pytest.skip("the 34-ID-C scan is in ../shared/data")
    for m, summary in entry["summary"].items():
        assert summary["peak_not_cut"]["invariant"], (m, summary["peak_not_cut"])
    cut = entry["variants"]["aps34idc sent raw, chip gaps masked"]
    assert all("PEAK_NEAR_EDGE" in r["warnings"] and r["decision"] == "uncertain" for r in cut.values())


def test_the_sixs_scan_answers_alike_where_its_sampling_is_determined(invariance):
    """The SixS scan is sampled at 1.5-1.9 on its own grid: gridded 2x and 3x, its central peak is under a voxel
    wide, and those answers must say the sampling is undetermined and stay uncertain. On the other variants
    (1x grid, shift, crops, raw scan, gap masks) the 3-class model gives one label within 0.1."""
    entry = invariance["datasets"].get("sixs")
    if entry is None:
        pytest.skip("the SixS scan is in ../shared/data")
    determined = entry["summary"]["defectscope-3class"]["sampling_determined"]
    assert determined["invariant"], determined
    for grid in ("sixs gridded x2", "sixs gridded x3"):
        for m, r in entry["variants"][grid].items():
            assert "SAMPLING_UNDETERMINED" in r["warnings"] and r["decision"] == "uncertain", (grid, m)


def test_simulated_answers_that_pass_the_checks_are_right(invariance):
    for name, entry in invariance["datasets"].items():
        if not name.startswith("simulated"):
            continue
        truth = name.split()[1]
        for variant, by_model in entry["variants"].items():
            for m, r in by_model.items():
                if "label" in r and not set(r["warnings"]) & {"SAMPLING_SENSITIVE", "MODELS_DISAGREE"}:
                    assert (r["label"] == "defect_free") == (truth == "defect_free"), (name, variant, m, r["label"])


def test_chip_gaps_off_the_peak_miss_its_brightest_pixel():
    """The invariance harness's realistic gap variant: 6-pixel gap rows and columns GAP_OFFSET pixels from the
    brightest pixel of the summed frames (masked pixels left out), towards the larger side of the frame."""
    from defectscope.training.invariance import GAP_OFFSET, gaps_off_the_peak

    frames = np.zeros((3, 64, 64), np.float32)
    frames[:, 10, 50] = 100.0
    frames[:, 40, 5] = 1e6  # a hot pixel, masked
    mask = np.zeros((64, 64), bool)
    mask[40, 5] = True
    gaps = gaps_off_the_peak(frames, mask)
    rows = np.flatnonzero(gaps[0].all(axis=1))
    cols = np.flatnonzero(gaps[0].all(axis=0))
    assert rows.tolist() == list(range(10 + GAP_OFFSET - 3, 10 + GAP_OFFSET + 3))
    assert cols.tolist() == list(range(50 - GAP_OFFSET - 3, 50 - GAP_OFFSET + 3))  # no room beyond the peak
    assert not gaps[:, 10, 50].any() and gaps.shape == frames.shape


def test_the_summary_leaves_out_variants_whose_peak_is_cut_then_those_whose_sampling_is_undetermined():
    from defectscope.training.invariance import summarise

    def row(label, p, warnings=()):
        return {"label": label, "probabilities": p, "warnings": list(warnings)}

    rows = [row("defect_free", [0.95, 0.05]), row("defect_free", [0.90, 0.10]),
            row("defective", [0.20, 0.80], ["PEAK_NEAR_EDGE"])]
    summary = summarise(rows)
    assert summary["labels"] == ["defect_free", "defective"] and not summary["invariant"]
    assert summary["peak_not_cut"] == {"labels": ["defect_free"], "spread": 0.05, "invariant": True}
    rows.append(row("defect_free", [0.70, 0.30], ["SAMPLING_SENSITIVE"]))  # warned otherwise: still counted
    assert summarise(rows)["peak_not_cut"]["spread"] == 0.25
    rows.append(row("defective", [0.40, 0.60], ["SAMPLING_UNDETERMINED"]))  # a grid too coarse for the fringes
    summary = summarise(rows)
    assert summary["peak_not_cut"]["labels"] == ["defect_free", "defective"]
    assert summary["sampling_determined"] == {"labels": ["defect_free"], "spread": 0.25, "invariant": False}
