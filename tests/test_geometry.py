"""Geometry: presets, SPEC §4 dict parsing and its errors, round trips, cache keys, xrayutilities import."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from defectscope.errors import BadGeometry
from defectscope.preprocessing.geometry import PRESETS, Geometry, geometry_from_dict

# Motor positions of the measured 34-ID-C scan #S 54 (shared/data/aps34idc_au111_s54/README.md).
AU_34IDC = {
    "preset": "aps-34idc",
    "direct_beam": [256, 256],
    "angles": {"theta": 0.22, "chi": 90.0, "phi": -5.0, "delta": 32.174, "gamma": 12.6346},
    "rocking": {"start_deg": -0.28, "step_deg": 0.005},
}


def preset_dict(name: str) -> dict:
    """A complete geometry for a preset: every motor at a distinct angle, explicit energy and distance."""
    p = PRESETS[name]
    angles = {m: 1.5 + 2.25 * k for k, m in enumerate(dict.fromkeys(p.sample_motors + p.detector_motors))}
    return {
        "preset": name,
        "energy_eV": 8300.0,
        "distance_m": 1.21,
        "direct_beam": [101.5, 57.0],
        "angles": angles,
        "rocking": {"motor": p.rocking_motor, "start_deg": -0.3, "step_deg": 0.011},
    }


def test_34idc_preset_matches_the_beamline_readme():
    g = geometry_from_dict(AU_34IDC)
    assert g.sample_circles == ("y+", "z-", "y+") and g.sample_motors == ("theta", "chi", "phi")
    assert g.detector_circles == ("y+", "x-") and g.detector_motors == ("delta", "gamma")
    assert g.pixel_directions == ("y-", "x+") and g.incident_beam == (0.0, 0.0, 1.0)
    assert (g.energy_ev, g.distance_m, g.pixel_size_m) == (9000.0, 0.5, (55e-6, 55e-6))
    assert g.rocking_motor == "theta"
    assert math.isclose(g.wavelength_angstrom, 1.3776, abs_tol=1e-4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    g = geometry_from_dict(preset_dict(name), n_frames=40, frame_shape=(48, 56))
    d = json.loads(json.dumps(g.to_dict()))
    again = geometry_from_dict(d, n_frames=40, frame_shape=(48, 56))
    assert again == g
    assert again.cache_key() == g.cache_key()
    assert hash(again) == hash(g)
    assert set(d) <= {"preset", "energy_eV", "distance_m", "pixel_size_m", "direct_beam", "angles", "rocking"}


def test_explicit_geometry_without_preset_round_trips():
    p = PRESETS["esrf-id01"]
    d = preset_dict("esrf-id01")
    del d["preset"]
    d.update(
        pixel_size_m=[75e-6, 55e-6],
        sample_circles=list(p.sample_circles),
        sample_motors=list(p.sample_motors),
        detector_circles=list(p.detector_circles),
        detector_motors=list(p.detector_motors),
        pixel_directions=list(p.pixel_directions),
    )
    g = geometry_from_dict(d)
    assert g.preset is None and g.incident_beam == (0.0, 0.0, 1.0)
    assert geometry_from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_explicit_fields_override_the_preset():
    g = geometry_from_dict({**AU_34IDC, "energy_eV": 10_500, "distance_m": 0.8, "pixel_size_m": [75e-6, 75e-6],
                            "pixel_directions": ["y-", "x-"]})  # fmt: skip
    assert (g.energy_ev, g.distance_m, g.pixel_size_m) == (10_500.0, 0.8, (75e-6, 75e-6))
    assert g.pixel_directions == ("y-", "x-")
    assert g.to_dict()["pixel_directions"] == ["y-", "x-"]  # differs from the preset, so written out


def test_p10_chi_offset_is_subtracted():
    d = preset_dict("petra-p10")
    d["angles"]["chi"] = 90.0
    sample, _ = geometry_from_dict(d).circle_angles_deg([0, 2])
    assert sample[2] == 0.0  # chi: reads 90, turns 0
    assert list(sample[1]) == pytest.approx([-0.3, -0.278])  # om, the rocking motor, one value per frame


def _with(**changes):
    d = json.loads(json.dumps(AU_34IDC))
    for key, value in changes.items():
        if value is ...:
            d.pop(key, None)
        else:
            d[key] = value
    return d


BAD = {
    "unknown key": (_with(energy=9000), "unknown key"),
    "unknown preset": (_with(preset="esrf-id99"), "unknown geometry preset"),
    "preset not a string": (_with(preset=3), "unknown geometry preset"),
    "missing direct_beam": (_with(direct_beam=...), "direct_beam"),
    "missing angles": (_with(angles=...), "angles"),
    "missing motor": (_with(angles={"chi": 90, "phi": -5, "delta": 32.1}), "gamma"),
    "unknown motor": (_with(angles={**AU_34IDC["angles"], "nu": 3.0}), "nu"),
    "angles not an object": (_with(angles=[1, 2, 3]), "angles"),
    "angle is a string": (_with(angles={**AU_34IDC["angles"], "chi": "90"}), "chi"),
    "angle is NaN": (_with(angles={**AU_34IDC["angles"], "phi": float("nan")}), "phi"),
    "energy is a string": (_with(energy_eV="9000"), "energy_eV"),
    "energy is a bool": (_with(energy_eV=True), "energy_eV"),
    "energy is infinite": (_with(energy_eV=float("inf")), "energy_eV"),
    "energy negative": (_with(energy_eV=-9000), "energy_eV"),
    "energy in keV": (_with(energy_eV=9.0), "energy_eV"),
    "distance zero": (_with(distance_m=0), "distance_m"),
    "distance in mm": (_with(distance_m=500), "distance_m"),
    "pixel size negative": (_with(pixel_size_m=[55e-6, -55e-6]), "pixel_size_m"),
    "pixel size one value": (_with(pixel_size_m=[55e-6]), "pixel_size_m"),
    "direct beam NaN": (_with(direct_beam=[float("nan"), 3]), "direct_beam"),
    "rocking missing": (_with(rocking=...), "start_deg"),
    "rocking unknown key": (_with(rocking={"start_deg": 0, "step_deg": 0.01, "stop_deg": 1}), "stop_deg"),
    "rocking not an object": (_with(rocking=[0, 0.01]), "rocking"),
    "rocking step zero": (_with(rocking={"start_deg": 0, "step_deg": 0}), "step_deg"),
    "rocking detector motor": (_with(rocking={"motor": "delta", "start_deg": 0, "step_deg": 0.01}), "delta"),
    "bad circle": (_with(sample_circles=["y+", "q-", "y+"]), "q-"),
    "circles and motors differ": (_with(sample_circles=["y+", "z-"]), "sample_circles"),
    "no preset, no defaults": (_with(preset=...), "names no preset"),
    "incident beam zero": (_with(incident_beam=[0, 0, 0]), "incident_beam"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_geometry_is_one_precise_line(case):
    d, needle = BAD[case]
    with pytest.raises(BadGeometry) as info:
        geometry_from_dict(d)
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert info.value.reason == "BAD_GEOMETRY"


@pytest.mark.parametrize("bad", [None, [1, 2], "aps-34idc"])
def test_geometry_must_be_an_object(bad):
    with pytest.raises(BadGeometry, match="must be an object"):
        geometry_from_dict(bad)


def test_bad_scan_size():
    with pytest.raises(BadGeometry, match="n_frames"):
        geometry_from_dict(AU_34IDC, n_frames=1)
    with pytest.raises(BadGeometry, match="frame_shape"):
        geometry_from_dict(AU_34IDC, n_frames=10, frame_shape=(256, 0))


def test_cache_key_identifies_geometry_motors_and_scan_size():
    g = geometry_from_dict(AU_34IDC, n_frames=201, frame_shape=(256, 256))
    key = g.cache_key()
    assert hash(key) == hash(geometry_from_dict(AU_34IDC, n_frames=201, frame_shape=(256, 256)).cache_key())
    moved = _with(angles={**AU_34IDC["angles"], "delta": 32.175})
    assert geometry_from_dict(moved, n_frames=201, frame_shape=(256, 256)).cache_key() != key
    assert g.with_scan(200, (256, 256)).cache_key() != key
    assert g.with_scan(201, (256, 255)).cache_key() != key
    started = _with(rocking={"start_deg": -0.27, "step_deg": 0.005})
    assert geometry_from_dict(started, n_frames=201, frame_shape=(256, 256)).cache_key() != key
    # The static value of the rocking motor is not used (its per-frame values are), nor is the preset name.
    static = _with(angles={**AU_34IDC["angles"], "theta": 5.0})
    assert geometry_from_dict(static, n_frames=201, frame_shape=(256, 256)).cache_key() == key
    explicit = {k: v for k, v in g.to_dict().items() if k != "preset"}
    p = PRESETS["aps-34idc"]
    explicit.update({k: getattr(p, k) for k in ("sample_circles", "sample_motors", "detector_circles",
                                                "detector_motors", "pixel_directions")})  # fmt: skip
    assert geometry_from_dict(explicit, n_frames=201, frame_shape=(256, 256)).cache_key() == key


def test_cache_key_needs_the_scan_size():
    with pytest.raises(BadGeometry, match="with_scan"):
        geometry_from_dict(AU_34IDC).cache_key()


def test_geometry_is_immutable_and_hashable():
    g = geometry_from_dict(AU_34IDC)
    with pytest.raises(AttributeError):
        g.energy_ev = 8000.0
    with pytest.raises(TypeError):
        g.angles["chi"] = 0.0  # a read-only mapping
    assert {g: 1}[geometry_from_dict(AU_34IDC)] == 1
    assert isinstance(g, Geometry)


def test_a_local_xrayutilities_conf_is_not_read(tmp_path):
    # Guards load_xrayutilities: xrayutilities reads ./xrayutilities.conf at import time.
    (tmp_path / "xrayutilities.conf").write_text("[xrayutilities]\nverbosity = 3\nwavelength = 0.5\n")
    code = (
        "from defectscope.preprocessing.geometry import load_xrayutilities; xu = load_xrayutilities(); "
        "import os; print('xrayutilities.conf' in xu.config.cfiles, os.getcwd())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    read_local, cwd = out.stdout.split()
    assert read_local == "False"
    assert cwd == str(tmp_path)  # and the working directory is restored
