"""Beamline geometry of a rocking scan, and the one place where its conventions are stated.

Conventions (used by every module of defectscope)
-------------------------------------------------
- **Laboratory frame** (xrayutilities notation, the CXI convention of bcdi and cohere): ``x`` horizontal,
  outboard, ``y`` vertical up, ``z`` along the incident beam (downstream); right-handed. All presets use it,
  with ``incident_beam = (0, 0, 1)``.
- **Circles** are written as xrayutilities writes them: ``'y+'`` is a right-handed rotation about ``+y`` for a
  positive angle, ``'y-'`` a left-handed one. Sample and detector circles are listed outermost first.
- **Angles** are in degrees. The angle a circle turns is the motor reading minus the preset's
  ``angle_offsets_deg`` for that motor (bcdi convention, e.g. P10's chi reads 90 deg when phi is vertical).
- **Frames** are indexed ``[frame, row, col]`` (C order, as tifffile and h5py read them). At all detector
  angles zero the direct beam hits pixel ``direct_beam = (row, col)`` (fractional, in the coordinates of the
  frames sent, so a region of interest shifts it) at ``distance_m`` from the centre of rotation;
  ``pixel_directions = (row direction, column direction)`` are the lab directions of increasing row and column.
- **Scattering vector** ``q = k_f - k_i`` with ``|k| = 2*pi/lambda``, in inverse angstrom: ``|q| = 4*pi*sin(theta)
  / lambda = 2*pi/d`` (xrayutilities' convention). q is expressed in the frame attached to the sample (the sample
  rotations are undone, as xrayutilities' ``Ang2Q`` does), i.e. the lab frame with all sample circles at zero.
  ``q_lab`` everywhere in defectscope means that frame.
- **Rocking**: frame ``i`` was measured with ``rocking_motor`` at ``rocking_start_deg + i * rocking_step_deg``
  and every other motor at its value in ``angles`` (a value given there for the rocking motor is ignored).
- The canonical map frame (axis 0 along Q) is built from this geometry in ``orthonormalise``.

A ``Geometry`` is built from a preset (``PRESETS``, defined in ``beamline_presets`` and importable from here)
and/or explicit fields with :func:`geometry_from_dict`, whose keys are those of SPEC §4 ``input.geometry``
(``preset``, ``energy_eV``, ``distance_m``, ``pixel_size_m``, ``direct_beam``, ``angles``, ``rocking``), plus,
for a beamline without preset, the explicit diffractometer keys ``sample_circles``, ``sample_motors``,
``detector_circles``, ``detector_motors``, ``pixel_directions``, ``incident_beam`` and ``angle_offsets_deg``.
Invalid input raises ``BadGeometry`` with a one-line message.
"""

from __future__ import annotations

import logging
import dataclasses
import math
import os
import re
import sys
import threading
import types
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from defectscope.errors import BadGeometry
from defectscope.preprocessing.beamline_presets import PRESETS, Preset  # noqa: F401 (Preset: re-exported)

_CIRCLE = re.compile(r"^[xyz][+-]$")

# Plausibility ranges: wide enough for every hard X-ray BCDI beamline, narrow enough to catch a unit slip
# (keV sent as eV, mm sent as m, um sent as m), which would otherwise give a silently wrong map.
ENERGY_RANGE_EV = (1_000.0, 100_000.0)
DISTANCE_RANGE_M = (0.05, 20.0)
PIXEL_RANGE_M = (1e-6, 1e-3)


# geometry_from_dict keys: SPEC §4 first, then the explicit diffractometer description.
SPEC_KEYS = ("preset", "energy_eV", "distance_m", "pixel_size_m", "direct_beam", "angles", "rocking")
DIFFRACTOMETER_KEYS = (
    "sample_circles",
    "sample_motors",
    "detector_circles",
    "detector_motors",
    "pixel_directions",
    "incident_beam",
    "angle_offsets_deg",
)
ROCKING_KEYS = ("motor", "start_deg", "step_deg")


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise BadGeometry(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise BadGeometry(f"{name} must be finite, got {value!r}")
    return value


def _in_range(name: str, value: Any, bounds: tuple[float, float], unit: str) -> float:
    value = _finite(name, value)
    if value <= 0:
        raise BadGeometry(f"{name} must be positive, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise BadGeometry(f"{name} = {value!r} is outside the plausible {bounds[0]:g}..{bounds[1]:g} {unit} (unit slip?)")
    return value


def _pair(name: str, value: Any) -> tuple[Any, Any]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise BadGeometry(f"{name} must be a list of 2 values, got {value!r}")
    return tuple(value)


def _names(name: str, value: Any, *, circles: bool) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise BadGeometry(f"{name} must be a list of strings, got {value!r}")
    out = tuple(value)
    for item in out:
        if not isinstance(item, str) or not item:
            raise BadGeometry(f"{name} must be a list of non-empty strings, got {value!r}")
        if circles and not _CIRCLE.match(item):
            raise BadGeometry(f"{name} entry {item!r} is not an axis such as 'x+', 'y-', 'z+'")
    return out


@dataclass(frozen=True)
class Geometry:
    """Everything needed to map the pixels of a rocking scan to q (conventions: module docstring).

    ``n_frames`` and ``frame_shape`` describe the scan the geometry is used for; they are not part of the
    beamline description (``to_dict`` leaves them out) but are part of ``cache_key``.
    """

    energy_ev: float
    distance_m: float
    pixel_size_m: tuple[float, float]
    direct_beam: tuple[float, float]
    sample_circles: tuple[str, ...]
    sample_motors: tuple[str, ...]
    detector_circles: tuple[str, ...]
    detector_motors: tuple[str, ...]
    pixel_directions: tuple[str, str]
    incident_beam: tuple[float, float, float]
    angles: Mapping[str, float]
    rocking_motor: str
    rocking_start_deg: float
    rocking_step_deg: float
    preset: str | None = None
    angle_offsets_deg: Mapping[str, float] = field(default_factory=dict)
    n_frames: int | None = None
    frame_shape: tuple[int, int] | None = None

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        put("energy_ev", _in_range("energy_eV", self.energy_ev, ENERGY_RANGE_EV, "eV"))
        put("distance_m", _in_range("distance_m", self.distance_m, DISTANCE_RANGE_M, "m"))
        put("pixel_size_m", tuple(_in_range("pixel_size_m", v, PIXEL_RANGE_M, "m") for v in _pair("pixel_size_m", self.pixel_size_m)))
        put("direct_beam", tuple(_finite("direct_beam", v) for v in _pair("direct_beam", self.direct_beam)))
        for name in ("sample_circles", "detector_circles", "pixel_directions"):
            put(name, _names(name, getattr(self, name), circles=True))
        for name in ("sample_motors", "detector_motors"):
            put(name, _names(name, getattr(self, name), circles=False))
        self._check_diffractometer()
        put("incident_beam", self._beam(self.incident_beam))
        known = set(self.sample_motors) | set(self.detector_motors)
        put("angles", self._angle_map("angles", self.angles, known))
        put("angle_offsets_deg", self._angle_map("angle_offsets_deg", self.angle_offsets_deg, known))
        if not isinstance(self.rocking_motor, str) or self.rocking_motor not in self.sample_motors:
            raise BadGeometry(f"rocking motor {self.rocking_motor!r} is not a sample motor {list(self.sample_motors)}")
        missing = [m for m in self.motors if m != self.rocking_motor and m not in self.angles]
        if missing:
            raise BadGeometry(f"angles lack motor(s) {missing} (needed: {list(self.motors)})")
        put("rocking_start_deg", _finite("rocking start_deg", self.rocking_start_deg))
        put("rocking_step_deg", _finite("rocking step_deg", self.rocking_step_deg))
        if self.rocking_step_deg == 0:
            raise BadGeometry("rocking step_deg must be non-zero")
        if self.preset is not None and not isinstance(self.preset, str):
            raise BadGeometry(f"preset must be a string, got {self.preset!r}")
        self._check_scan()

    def _check_diffractometer(self):
        if len(self.sample_circles) != len(self.sample_motors) or not self.sample_circles:
            raise BadGeometry(f"sample_circles {list(self.sample_circles)} and sample_motors {list(self.sample_motors)} differ in length or are empty")
        if len(self.detector_circles) != len(self.detector_motors):
            raise BadGeometry(f"detector_circles {list(self.detector_circles)} and detector_motors {list(self.detector_motors)} differ in length")
        for name in ("sample_motors", "detector_motors"):
            motors = getattr(self, name)
            if len(set(motors)) != len(motors):
                raise BadGeometry(f"{name} {list(motors)} names a motor twice")
        if len(self.pixel_directions) != 2 or self.pixel_directions[0][0] == self.pixel_directions[1][0]:
            raise BadGeometry(f"pixel_directions must be two different axes (row, col), got {list(self.pixel_directions)}")

    @staticmethod
    def _beam(value) -> tuple[float, float, float]:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
            raise BadGeometry(f"incident_beam must be a list of 3 numbers, got {value!r}")
        beam = tuple(_finite("incident_beam", v) for v in value)
        if math.hypot(*beam) == 0:
            raise BadGeometry("incident_beam must not be the zero vector")
        return beam

    @staticmethod
    def _angle_map(name: str, value, known: set[str]) -> Mapping[str, float]:
        if not isinstance(value, Mapping):
            raise BadGeometry(f"{name} must be an object of motor name -> degrees, got {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise BadGeometry(f"{name} names unknown motor(s) {unknown} (known: {sorted(known)})")
        return types.MappingProxyType({k: _finite(f"{name}[{k!r}]", v) for k, v in sorted(value.items())})

    def _check_scan(self):
        if self.n_frames is not None:
            if isinstance(self.n_frames, bool) or not isinstance(self.n_frames, Integral) or self.n_frames < 2:
                raise BadGeometry(f"n_frames must be an integer >= 2 (a rocking scan), got {self.n_frames!r}")
            object.__setattr__(self, "n_frames", int(self.n_frames))
        if self.frame_shape is not None:
            shape = _pair("frame_shape", self.frame_shape)
            if any(isinstance(n, bool) or not isinstance(n, Integral) or n < 2 for n in shape):
                raise BadGeometry(f"frame_shape must be two integers >= 2, got {self.frame_shape!r}")
            object.__setattr__(self, "frame_shape", tuple(int(n) for n in shape))

    # Derived values -------------------------------------------------------------------------------
    @property
    def motors(self) -> tuple[str, ...]:
        """Every motor once, sample chain first (a motor on both chains, like SixS beta, appears once)."""
        return tuple(dict.fromkeys(self.sample_motors + self.detector_motors))

    @property
    def wavelength_angstrom(self) -> float:
        # hc = 12398.419843320026 eV*angstrom (CODATA 2018), the value xrayutilities uses.
        return 12398.419843320026 / self.energy_ev

    def circle_angles_deg(self, frame_indices) -> tuple[list, list]:
        """Angles turned by each sample and detector circle (outermost first) for the given frames.

        The rocking motor gets an array (one value per frame); the others a float. Offsets are applied.
        """
        frames = np.asarray(frame_indices, dtype=np.float64)
        rocking = self.rocking_start_deg + frames * self.rocking_step_deg

        def value(motor):
            raw = rocking if motor == self.rocking_motor else self.angles[motor]
            return raw - self.angle_offsets_deg.get(motor, 0.0)

        return [value(m) for m in self.sample_motors], [value(m) for m in self.detector_motors]

    def with_scan(self, n_frames: int, frame_shape) -> "Geometry":
        """This geometry for a scan of ``n_frames`` frames of ``frame_shape`` (rows, cols)."""
        return dataclasses.replace(self, n_frames=n_frames, frame_shape=tuple(frame_shape))

    def cache_key(self) -> tuple:
        """Hashable identity of everything that decides the pixel -> q mapping.

        Geometry, effective motor positions, number of frames and frame shape; not the preset name (two
        spellings of the same geometry share a mapping) nor the ignored static value of the rocking motor.
        """
        if self.n_frames is None or self.frame_shape is None:
            raise BadGeometry("geometry has no n_frames/frame_shape yet: call with_scan(n_frames, frame_shape)")
        angles = tuple((m, self.angles[m] - self.angle_offsets_deg.get(m, 0.0)) for m in self.motors if m != self.rocking_motor)
        start = self.rocking_start_deg - self.angle_offsets_deg.get(self.rocking_motor, 0.0)
        return (
            "geometry-v1",
            self.energy_ev,
            self.distance_m,
            self.pixel_size_m,
            self.direct_beam,
            self.sample_circles,
            self.sample_motors,
            self.detector_circles,
            self.detector_motors,
            self.pixel_directions,
            self.incident_beam,
            angles,
            self.rocking_motor,
            start,
            self.rocking_step_deg,
            self.n_frames,
            self.frame_shape,
        )

    def __hash__(self):
        return hash((self.preset, tuple(self.angles.items()), tuple(self.angle_offsets_deg.items()),
                     self.energy_ev, self.distance_m, self.direct_beam, self.rocking_motor,
                     self.rocking_start_deg, self.rocking_step_deg, self.n_frames, self.frame_shape))

    def to_dict(self) -> dict:
        """JSON-ready dict in the SPEC §4 form; ``geometry_from_dict(g.to_dict())`` rebuilds ``g``.

        Diffractometer keys are written only where they differ from the preset (all of them without one).
        """
        d: dict[str, Any] = {}
        if self.preset is not None:
            d["preset"] = self.preset
        d.update(
            energy_eV=self.energy_ev,
            distance_m=self.distance_m,
            pixel_size_m=list(self.pixel_size_m),
            direct_beam=list(self.direct_beam),
            angles=dict(self.angles),
            rocking={"motor": self.rocking_motor, "start_deg": self.rocking_start_deg, "step_deg": self.rocking_step_deg},
        )
        preset = PRESETS.get(self.preset) if self.preset else None
        for key in DIFFRACTOMETER_KEYS:
            mine = getattr(self, key)
            theirs = getattr(preset, key) if preset is not None else None
            if preset is None or _plain(mine) != _plain(theirs):
                d[key] = _plain(mine)
        return d


def _plain(value):
    if isinstance(value, Mapping):
        return {k: float(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def geometry_from_dict(d: dict, *, n_frames: int | None = None, frame_shape=None) -> Geometry:
    """Build a :class:`Geometry` from a preset name and/or explicit fields (SPEC §4 ``input.geometry``).

    Explicit fields override the preset's. Unknown keys, an unknown preset, missing, mistyped or non-finite
    values, non-positive or implausible energy/distance/pixel size and unknown motor names raise
    ``BadGeometry`` with a one-line message.
    """
    if not isinstance(d, Mapping):
        raise BadGeometry(f"geometry must be an object, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in SPEC_KEYS + DIFFRACTOMETER_KEYS)
    if unknown:
        raise BadGeometry(f"geometry has unknown key(s) {unknown} (allowed: {list(SPEC_KEYS + DIFFRACTOMETER_KEYS)})")
    name = d.get("preset")
    preset = None
    if name is not None:
        if not isinstance(name, str) or name not in PRESETS:
            raise BadGeometry(f"unknown geometry preset {name!r} (known: {sorted(PRESETS)})")
        preset = PRESETS[name]
    rocking = d.get("rocking", {})
    if not isinstance(rocking, Mapping):
        raise BadGeometry(f"rocking must be an object with {list(ROCKING_KEYS)}, got {type(rocking).__name__}")
    bad = sorted(str(k) for k in rocking if k not in ROCKING_KEYS)
    if bad:
        raise BadGeometry(f"rocking has unknown key(s) {bad} (allowed: {list(ROCKING_KEYS)})")

    def pick(key, preset_attr=None, value=None):
        if value is not None:
            return value
        if key in d and d[key] is not None:
            return d[key]
        if preset is not None and preset_attr is not None and getattr(preset, preset_attr) is not None:
            return getattr(preset, preset_attr)
        raise BadGeometry(f"geometry lacks {key!r}" + (f" (preset {name!r} has no default)" if preset else " (and names no preset)"))

    fields = dict(
        energy_ev=pick("energy_eV", "energy_ev"),
        distance_m=pick("distance_m", "distance_m"),
        pixel_size_m=pick("pixel_size_m", "pixel_size_m"),
        direct_beam=pick("direct_beam"),
        angles=pick("angles"),
        rocking_motor=rocking.get("motor") if rocking.get("motor") is not None else pick("rocking.motor", "rocking_motor"),
        rocking_start_deg=pick("rocking.start_deg", value=rocking.get("start_deg")),
        rocking_step_deg=pick("rocking.step_deg", value=rocking.get("step_deg")),
        preset=name,
        n_frames=n_frames,
        frame_shape=frame_shape,
    )
    for key in DIFFRACTOMETER_KEYS:
        if key == "angle_offsets_deg" and key not in d and preset is None:
            fields[key] = {}
        elif key == "incident_beam" and key not in d and preset is None:
            fields[key] = (0.0, 0.0, 1.0)
        else:
            fields[key] = pick(key, key)
    return Geometry(**fields)


# xrayutilities reads ``xrayutilities.conf`` from the working directory when it is first imported; a stray
# file there could change its defaults (verbosity, threads, wavelength). It is imported once, with this
# module, from a neutral directory: a module import, so before any server thread exists, never inside
# one (changing the working directory is process-wide). ``~/.xrayutilities.conf`` is still read; it can
# change verbosity and thread count, never our results: energy and every geometry value are passed.
def _import_xrayutilities():
    if "xrayutilities" in sys.modules:
        return sys.modules["xrayutilities"]
    if not Path("xrayutilities.conf").exists():
        import xrayutilities
        return xrayutilities
    if threading.active_count() > 1:  # imported late, by a thread: never move the process's directory then
        logging.getLogger(__name__).warning("./xrayutilities.conf is read by xrayutilities (imported with threads "
                                            "running); it cannot change results, all values are passed")
        import xrayutilities
        return xrayutilities
    previous = os.getcwd()
    os.chdir(Path(__file__).resolve().parent)
    try:
        import xrayutilities
    finally:
        os.chdir(previous)
    return xrayutilities


_XU = _import_xrayutilities()


def load_xrayutilities():
    """xrayutilities, as imported with this module (see above)."""
    return _XU
