"""A raw measured rocking scan through the real server: 34-ID-C Au(111), scan 54 (SPEC §4 kind 'scan')."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.server.client import Client

from conftest import bragg_map

AU111_Q = 2 * np.pi * np.sqrt(3) / 4.0782  # |Q| of Au(111), 2π/d convention: 2.668 1/Å


@pytest.fixture(scope="module")
def scan_54(shared_data):
    from defectscope.preprocessing.scans import load_spec_tiff_scan

    d = shared_data / "aps34idc_au111_s54"
    return load_spec_tiff_scan(d / "example.spec", 54, d / "Staff20-1a_S0054",
                               dark=d / "dark.tif", whitefield=d / "whitefield.tif")


def test_34idc_scan_over_zeromq(server, scan_54):
    frames, geometry, mask = scan_54
    with Client(server.endpoint, timeout_s=60, retries=0) as client:
        reply = client.classify_scan(frames, geometry.to_dict(), mask=mask, request_id="scan-0054",
                                     return_prepared=True)
        assert reply["ok"] and reply["request_id"] == "scan-0054"
        assert reply["label"] in reply["classes"]
        assert abs(sum(reply["probabilities"]) - 1) < 1e-5
        t = reply["timings_ms"]
        # Timings cover every stage, and the stages add up to no more than the total.
        assert {"decode", "orthonormalise", "prepare", "infer", "total"} <= set(t)
        assert t["orthonormalise"] > 0 and t["prepare"] > 0 and t["infer"] > 0
        assert t["decode"] + t["orthonormalise"] + t["prepare"] + t["infer"] <= t["total"] + 1e-3
        prepared = reply["prepared"]
        assert prepared.shape == (64, 64, 64) and prepared.max() == pytest.approx(1.0)
        # The measured Bragg peak, centred: its centre of mass sits on the central voxel.
        com = np.array(np.unravel_index(np.argmax(prepared), prepared.shape))
        assert np.all(np.abs(com - 32) <= 3)
        # The second scan with the same geometry hits the cached pixel->voxel mapping: cheaper.
        again = client.classify_scan(frames, geometry.to_dict(), mask=mask, request_id="scan-0054-b")
        assert again["probabilities"] == reply["probabilities"]


def test_34idc_orthonormalised_peak_is_au111(scan_54):
    from defectscope.preprocessing.orthonormalise import Orthonormaliser

    frames, geometry, mask = scan_54
    qmap = Orthonormaliser()(frames, geometry, mask=mask)
    peak = np.unravel_index(np.argmax(qmap.volume), qmap.volume.shape)
    q_norm = qmap.q_norm_at(peak)
    assert abs(q_norm - AU111_Q) / AU111_Q < 0.01, q_norm
    # Axis 0 of the canonical frame is along Q at the peak (within a degree).
    q = np.asarray(qmap.q_at(peak), dtype=float)
    assert np.degrees(np.arccos(q[0] / np.linalg.norm(q))) < 1.0


def test_scan_sent_as_one_buffer_equals_one_part_per_frame(server):
    """A synthetic scan: the stacked and the per-frame encodings give the same answer."""
    rng = np.random.default_rng(4)
    peak = bragg_map(shape=(24, 40, 48), centre=(12.3, 19.6, 25.2), size=(5, 4, 3), peak=2e4, noise=False)
    frames = rng.poisson(peak + 0.2).astype("<u4")
    geometry = {"preset": "aps-34idc", "direct_beam": [300.0, 290.0],
                "angles": {"chi": 90.0, "phi": -5.0, "delta": 32.174, "gamma": 12.6346},
                "rocking": {"motor": "theta", "start_deg": 0.1, "step_deg": 0.004}}
    with Client(server.endpoint, timeout_s=30, retries=0) as client:
        whole = client.classify_scan(frames, geometry, per_frame=False)
        parts = client.classify_scan(list(frames), geometry)
    assert whole["probabilities"] == parts["probabilities"]
    assert whole["timings_ms"]["orthonormalise"] > 0


def test_34idc_scan_streamed_frame_by_frame(server, scan_54):
    """The measured scan sent one frame per message as it would be measured: the answer of the whole scan."""
    frames, geometry, mask = scan_54
    with Client(server.endpoint, timeout_s=60, retries=0) as client:
        whole = client.classify_scan(frames, geometry.to_dict(), mask=mask)
        streamed = client.classify_scan_stream(frames, geometry.to_dict(), mask=mask, request_id="scan-0054-s")
    assert streamed["probabilities"] == whole["probabilities"]
    t = streamed["timings_ms"]
    # After the last frame only its own gridding, the box, the preparation and the inference remain.
    assert 0 < t["after_last_frame"] < t["total"]
