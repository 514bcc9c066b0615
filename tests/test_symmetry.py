"""The 8 symmetries of the plane ⊥ Q and the symmetrised / ensemble scoring of training.symmetry."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("finufft")
pytest.importorskip("h5py")

from defectscope.training import symmetry  # noqa: E402
from defectscope.training.data import mirror_about_centre  # noqa: E402


def _map(seed=0, n=16):
    """A random map whose first plane along axes 1 and 2 is zero, as a prepared map's edges are."""
    x = np.random.default_rng(seed).random((n, n, n)).astype(np.float32)
    x[:, 0, :] = 0
    x[:, :, 0] = 0
    return x


def test_the_eight_images_are_distinct_and_the_first_is_the_map():
    x = _map()
    images = symmetry.symmetry_images(x)
    assert images.shape == (8, *x.shape)
    np.testing.assert_array_equal(images[0], x)
    flat = images.reshape(8, -1)
    assert len({row.tobytes() for row in flat}) == 8
    # Axis 0 (along Q) is never flipped: every image keeps each q_par plane's total.
    np.testing.assert_allclose(images.sum(axis=(2, 3)), np.broadcast_to(x.sum(axis=(1, 2)), (8, x.shape[0])), rtol=1e-5)


def test_the_eight_images_form_a_group():
    """The images of any image are the same eight maps: symmetrising is invariant to each symmetry."""
    x = _map(1)
    reference = {img.tobytes() for img in symmetry.symmetry_images(x)}
    for img in symmetry.symmetry_images(x):
        assert {again.tobytes() for again in symmetry.symmetry_images(img)} == reference
    # The 180° rotation about Q is the two mirrors; applying it twice gives the map back.
    r = symmetry.symmetry_images(x)[3]
    np.testing.assert_array_equal(mirror_about_centre(mirror_about_centre(r, 1), 2), x)


def test_average_log_probabilities_is_the_renormalised_geometric_mean():
    p = np.array([[[0.9, 0.1], [0.5, 0.5]], [[0.2, 0.8], [0.2, 0.8]]])
    out = symmetry.average_log_probabilities(p, axis=1)
    g = np.sqrt(np.array([0.9 * 0.5, 0.1 * 0.5]))
    np.testing.assert_allclose(out[0], g / g.sum())
    np.testing.assert_allclose(out[1], [0.2, 0.8])
    with pytest.raises(ValueError):
        symmetry.symmetry_images(np.zeros((4, 4, 6), np.float32))


def test_scoring_a_model_and_an_ensemble_on_a_dataset(tmp_path, fixture_model):
    """End to end on a tiny simulated file and the fixture model: counts, ranges, the JSON it writes."""
    from defectscope.training.runner import simulate_dataset
    from defectscope.training.sim_config import SimulationConfig

    cfg = SimulationConfig(orientations_per_configuration=2, split_fractions=(0.34, 0.33, 0.33))
    data = simulate_dataset(6, tmp_path / "tiny.h5", cfg, seed=5, workers=1, progress=False)
    out = tmp_path / "sym.json"
    assert symmetry.main([str(fixture_model), str(fixture_model), str(data), "--split", "all",
                          "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] + result["refused"] == 6
    (entry,) = result["models"].values()  # the same path twice: one entry
    assert len(entry["accuracy_each_symmetry"]) == 8
    assert entry["accuracy_each_symmetry"][0] == entry["accuracy"]
    for value in (entry["accuracy"], entry["accuracy_symmetrised"], result["ensemble"]["accuracy"]):
        assert 0.0 <= value <= 1.0
    # Two copies of one model: the ensemble is that model.
    assert result["ensemble"]["accuracy"] == entry["accuracy"]
    assert result["ensemble"]["accuracy_symmetrised"] == entry["accuracy_symmetrised"]
