"""The diffractometers of the beamlines defectscope knows by name: ``PRESETS``, name -> :class:`Preset`.

A preset gives circles, motor names and defaults in the conventions stated in ``geometry`` (laboratory
frame, circle notation, angle offsets); ``geometry.geometry_from_dict`` builds a ``Geometry`` from one, and
explicit fields override it. Each preset's ``doc`` says where its values come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Preset:
    """A diffractometer: circles, motor names and defaults. ``doc`` says where the values come from."""

    name: str
    doc: str
    sample_circles: tuple[str, ...]
    sample_motors: tuple[str, ...]
    detector_circles: tuple[str, ...]
    detector_motors: tuple[str, ...]
    pixel_directions: tuple[str, str]
    pixel_size_m: tuple[float, float]
    rocking_motor: str
    incident_beam: tuple[float, float, float] = (0.0, 0.0, 1.0)
    energy_ev: float | None = None
    distance_m: float | None = None
    angle_offsets_deg: Mapping[str, float] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="aps-34idc",
            doc="APS 34-ID-C. Sample: theta (y+), chi (z-), phi (y+); detector: delta (y+, in plane), "
            "gamma (x-, out of plane); Timepix 55 um, rows y-, columns x+; rocking theta; "
            "defaults 9 keV, 0.5 m (cohere 'aps_34idc', bcdi '34ID'). Motor names: theta, chi, phi, delta, gamma.",
            sample_circles=("y+", "z-", "y+"),
            sample_motors=("theta", "chi", "phi"),
            detector_circles=("y+", "x-"),
            detector_motors=("delta", "gamma"),
            pixel_directions=("y-", "x+"),
            pixel_size_m=(55e-6, 55e-6),
            rocking_motor="theta",
            energy_ev=9000.0,
            distance_m=0.5,
        ),
        Preset(
            name="esrf-id01",
            doc="ESRF ID01 (bcdi 'ID01'). Sample: mu (y-), eta (x-), phi (y-); detector: nu (y-, in plane), "
            "delta (x-, out of plane); Maxipix 55 um, rows y-, columns x+; rocking eta (phi for in-plane scans). "
            "Motor names: mu, eta, phi, nu, delta.",
            sample_circles=("y-", "x-", "y-"),
            sample_motors=("mu", "eta", "phi"),
            detector_circles=("y-", "x-"),
            detector_motors=("nu", "delta"),
            pixel_directions=("y-", "x+"),
            pixel_size_m=(55e-6, 55e-6),
            rocking_motor="eta",
        ),
        Preset(
            name="petra-p10",
            doc="PETRA III P10 six-circle (bcdi 'P10'). Sample: mu (y+), om (x-), chi (z+), phi (y-); detector: "
            "gamma (y+, in plane), delta (x-, out of plane); Eiger 4M 75 um, rows y-, columns x- (seen from "
            "upstream); chi reads 90 deg when phi is vertical (offset 90); rocking om (phi for in-plane scans). "
            "Motor names: mu, om, chi, phi, gamma, delta.",
            sample_circles=("y+", "x-", "z+", "y-"),
            sample_motors=("mu", "om", "chi", "phi"),
            detector_circles=("y+", "x-"),
            detector_motors=("gamma", "delta"),
            pixel_directions=("y-", "x-"),
            pixel_size_m=(75e-6, 75e-6),
            rocking_motor="om",
            angle_offsets_deg={"chi": 90.0},
        ),
        Preset(
            name="soleil-sixs",
            doc="SOLEIL SixS, vertical geometry (bcdi 'SIXS_2019'). beta (x-) tilts the whole diffractometer, so "
            "it is both the outer sample circle and the outer detector circle. Sample: beta (x-), mu (y+); "
            "detector: beta (x-), gamma (y+, in plane), delta (x-, out of plane); Maxipix 55 um, rows y-, "
            "columns x+; rocking mu. Motor names: beta, mu, gamma, delta.",
            sample_circles=("x-", "y+"),
            sample_motors=("beta", "mu"),
            detector_circles=("x-", "y+", "x-"),
            detector_motors=("beta", "gamma", "delta"),
            pixel_directions=("y-", "x+"),
            pixel_size_m=(55e-6, 55e-6),
            rocking_motor="mu",
        ),
    )
}
