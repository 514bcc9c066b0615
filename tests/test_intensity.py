"""``input.intensity`` (SPEC §4): maps scaled to a maximum of 1, and amplitude maps sqrt(I)/max as neural
phase-retrieval tools store them, are classified as the counts they came from, with a warning that the
count-based checks were not applied; a scaled map sent as counts is refused with a message naming the way on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from defectscope.errors import BadMessage, LowSignal, NonFinite
from defectscope.preprocessing.pipeline import prepare
from defectscope.server.client import Client

from conftest import bragg_map

ROUNDING = 1e-5  # float32 rounding of max-normalised maps, carried through the model


@pytest.fixture(scope="module")
def counts():
    return bragg_map(seed=21).astype(np.float32)


def reasons(warnings):
    return [w["reason"] for w in warnings]


def test_counts_relative_and_amplitude_prepare_alike(counts):
    as_counts = prepare(counts)
    relative = prepare(counts / counts.max(), intensity="relative")
    amplitude = prepare(np.sqrt(counts / counts.max()), intensity="amplitude")
    for p in (relative, amplitude):
        np.testing.assert_allclose(p.array, as_counts.array, atol=ROUNDING)
        assert "RELATIVE_INTENSITY" in reasons(p.warnings)
    assert "RELATIVE_INTENSITY" not in reasons(as_counts.warnings)
    assert (as_counts.report["intensity"], relative.report["intensity"], amplitude.report["intensity"]) == \
        ("counts", "relative", "amplitude")


def test_count_based_checks_become_a_warning(counts):
    weak = counts / counts.max() * 500  # a peak of 500: LOW_COUNTS as counts, not judged as relative
    assert "LOW_COUNTS" in reasons(prepare(weak).warnings)
    relative = prepare(weak, intensity="relative")
    assert "LOW_COUNTS" not in reasons(relative.warnings) and "RELATIVE_INTENSITY" in reasons(relative.warnings)


def test_scaled_map_as_counts_is_refused_naming_the_options(counts):
    with pytest.raises(LowSignal) as info:
        prepare(counts / counts.max())
    assert "'relative'" in str(info.value) and "'amplitude'" in str(info.value) and "--intensity" in str(info.value)
    with pytest.raises(LowSignal) as info:  # integer counts under the floor: no hint about scaling
        prepare(np.minimum(counts, 5).astype(np.uint16))
    assert "relative" not in str(info.value)


def test_bad_intensity_values_are_refused(counts):
    with pytest.raises(BadMessage, match="counts, relative, amplitude"):
        prepare(counts, intensity="photons")
    negative = np.sqrt(counts / counts.max())
    negative[0, 0, 0] = -0.5
    with pytest.raises(NonFinite, match="amplitude"):
        prepare(negative, intensity="amplitude")


def test_over_the_wire(server, counts):
    amplitude = np.sqrt(counts / counts.max())
    with Client(server.endpoint, timeout_s=60, retries=0) as client:
        by_counts = client.classify(counts)
        by_relative = client.classify(counts / counts.max(), intensity="relative")
        by_amplitude = client.classify(amplitude, intensity="amplitude")
        refused = client.classify(amplitude, raise_on_error=False)
        unknown = client.classify(counts, intensity="photons", raise_on_error=False)
    np.testing.assert_allclose(by_relative["probabilities"], by_counts["probabilities"], atol=ROUNDING)
    np.testing.assert_allclose(by_amplitude["probabilities"], by_counts["probabilities"], atol=ROUNDING)
    assert "RELATIVE_INTENSITY" in reasons(by_amplitude["warnings"])
    assert refused["error"]["reason"] == "LOW_SIGNAL" and "amplitude" in refused["error"]["message"]
    assert unknown["error"]["reason"] == "BAD_MESSAGE" and "intensity" in unknown["error"]["message"]


def test_amplitude_scan_whole_and_streamed(server):
    """An amplitude scan's frames are squared before gridding: the answer of the counts they came from."""
    from test_orthonormalise import make_synthetic

    geometry, frames, _ = make_synthetic()
    amplitude = np.sqrt(frames / frames.max()).astype(np.float32)
    with Client(server.endpoint, timeout_s=60, retries=0) as client:
        by_counts = client.classify_scan(frames, geometry.to_dict())
        by_amplitude = client.classify_scan(amplitude, geometry.to_dict(), intensity="amplitude")
        streamed = client.classify_scan_stream(amplitude, geometry.to_dict(), intensity="amplitude")
    for reply in (by_amplitude, streamed):
        np.testing.assert_allclose(reply["probabilities"], by_counts["probabilities"], atol=1e-4)
        assert "RELATIVE_INTENSITY" in reasons(reply["warnings"])


def test_file_request_carries_intensity(make_server, counts, tmp_path):
    np.save(tmp_path / "amplitude.npy", np.sqrt(counts / counts.max()))
    np.save(tmp_path / "counts.npy", counts)
    with Client(make_server(data_root=tmp_path).endpoint, timeout_s=60, retries=0) as client:
        by_counts = client.classify_file("counts.npy")
        by_amplitude = client.classify_file("amplitude.npy", intensity="amplitude")
    np.testing.assert_allclose(by_amplitude["probabilities"], by_counts["probabilities"], atol=ROUNDING)


def _cli_json(*args) -> dict:
    done = subprocess.run([sys.executable, "-m", "defectscope.server.cli", "classify", *map(str, args), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cli_intensity_option(fixture_model, counts, tmp_path):
    np.save(tmp_path / "amplitude.npy", np.sqrt(counts / counts.max()))
    np.save(tmp_path / "counts.npy", counts)
    by_counts = _cli_json(tmp_path / "counts.npy", "--model", fixture_model)
    by_amplitude = _cli_json(tmp_path / "amplitude.npy", "--model", fixture_model, "--intensity", "amplitude")
    np.testing.assert_allclose(by_amplitude["probabilities"], by_counts["probabilities"], atol=ROUNDING)
    refused = subprocess.run([sys.executable, "-m", "defectscope.server.cli", "classify", str(tmp_path / "amplitude.npy"),
                              "--model", str(fixture_model)], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--intensity" in refused.stderr and "Traceback" not in refused.stderr


def test_measured_amplitude_equals_its_counts(shared_data, tmp_path):
    """The 3D-CDI-NN example stores sqrt(I)/max (``ft_crop_64.npy``) beside the counts (``ft_crop_64.tif``,
    in ImageJ axis order: the repository's loader turns it with rot90(tif[:, :, ::-1], 1, axes=(0, 2))).
    Classified by the bundled model, the amplitude gives the answer of the counts in the same orientation."""
    import tifffile

    folder = shared_data / "cdinn_example_64"
    counts = tifffile.imread(folder / "ft_crop_64.tif")
    np.save(tmp_path / "counts.npy", np.ascontiguousarray(np.rot90(counts[:, :, ::-1], 1, axes=(0, 2))))
    by_counts = _cli_json(tmp_path / "counts.npy")
    by_amplitude = _cli_json(folder / "ft_crop_64.npy", "--intensity", "amplitude")
    assert by_amplitude["label"] == by_counts["label"]
    np.testing.assert_allclose(by_amplitude["probabilities"], by_counts["probabilities"], atol=1e-4)
