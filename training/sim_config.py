"""``SimulationConfig``: every knob of the training-data simulator in one frozen, versioned object.

It is written into every dataset (attribute ``simulator_config``), so a dataset says how it was made.
A config file (JSON, or TOML with a ``[simulate]`` table or top-level keys) overrides the defaults;
unknown keys are refused, because a misspelt option silently ignored would change the data.
Older schema versions are patched forward one step at a time (``_PATCHES``), newer ones refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from defectscope.errors import BadMessage
from defectscope.preprocessing.config import read_config_file
from defectscope.training.crystals import ELEMENTS, SIZES

SCHEMA_VERSION = 1
CLASSES = ("defect_free", "screw", "edge")  # SPEC §3 class names, in label order


@dataclass(frozen=True)
class SimulationConfig:
    schema_version: int = SCHEMA_VERSION
    # Crystals ------------------------------------------------------------------------------------
    elements: tuple[str, ...] = ("Al", "Ag", "Au", "Pt")  # drawn uniformly per configuration
    sizes: tuple[str, ...] = ("small",)  # "small" (40 cells, ~1e5 atoms) and/or "large" (80 cells, ~1e6)
    # γ111/γ100: facet distance ratio of the Wulff shape. 0.90-1.00 reproduces the paper's atom counts
    # (small: 1.0-1.4e5 atoms, 9-12 nm high for Au) with the 65-75 % truncation.
    surface_energy_ratio_range: tuple[float, float] = (0.90, 1.00)
    truncation_range: tuple[float, float] = (0.65, 0.75)  # remaining fraction of the free particle's height
    truncate: bool = True  # False: free Wulff particles (no substrate interface)
    # Defects -------------------------------------------------------------------------------------
    class_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # defect_free, screw, edge
    cd_fraction: float = 0.75  # CD vs RPD; the paper's best experimental model used 75 % CD / 25 % RPD
    cd_radius_fraction: float = 0.10  # CD: line within this fraction of the lateral size from the centre
    # RPD: None = anywhere in the particle (uniform in its volume); a number r = uniform in the part of the
    # volume whose distance to the line through the centroid along t is at most r × the lateral size.
    # 0.25 reproduces the paper's random-position peak maxima (supplement Fig. 15; docs/experiments.md, "Random positions calibrated to the paper's peak maxima").
    rpd_radius_fraction: float | None = None
    # Reflection: a {111} reflection with g·b ≠ 0; this fraction of defective configurations is simulated
    # at a g·b = 0 reflection instead, and flagged `invisible`.
    invisible_fraction: float = 0.0
    # Sampling ------------------------------------------------------------------------------------
    shape: tuple[int, int, int] = (64, 64, 64)
    orientations_per_configuration: int = 10
    oversampling_range: tuple[float, float] = (2.0, 4.0)
    subpixel_shift: bool = True
    # Noise and detector --------------------------------------------------------------------------
    peak_counts_range: tuple[float, float] = (1e3, 1e6)  # log-uniform
    background_range: tuple[float, float] = (0.0, 0.0)  # mean counts per voxel, flat; (0, 0): none
    gap_probability: float = 0.0  # probability that a pattern has detector-gap stripes
    gap_count_range: tuple[int, int] = (1, 2)
    gap_width_voxels_range: tuple[int, int] = (1, 3)
    gap_offset_max_voxels: int = 12  # stripes start within this many voxels of the centre
    masked_voxel_fraction_range: tuple[float, float] = (0.0, 0.0)
    # Numerics ------------------------------------------------------------------------------------
    nufft_eps: float = 1e-5  # NUFFT tolerance (diffraction.DEFAULT_NUFFT_EPS: why this value)
    # Dataset -------------------------------------------------------------------------------------
    split_fractions: tuple[float, float, float] = (0.85, 0.10, 0.05)  # train, validation, test
    compression_level: int = 4  # gzip level of the counts

    def __post_init__(self):
        _check(self.schema_version == SCHEMA_VERSION,
               f"simulator config schema_version must be {SCHEMA_VERSION}, got {self.schema_version!r}")
        for name in ("elements", "sizes", "shape", "class_weights", "split_fractions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("surface_energy_ratio_range", "truncation_range", "oversampling_range", "peak_counts_range",
                     "background_range", "masked_voxel_fraction_range"):
            object.__setattr__(self, name, _range(name, getattr(self, name)))
        for name in ("gap_count_range", "gap_width_voxels_range"):
            lo, hi = _range(name, getattr(self, name))
            _check(lo == int(lo) and hi == int(hi), f"{name} must hold integers")
            object.__setattr__(self, name, (int(lo), int(hi)))
        unknown = [e for e in self.elements if e not in ELEMENTS]
        _check(self.elements and not unknown, f"elements must be a non-empty subset of {sorted(ELEMENTS)}")
        _check(self.sizes and all(s in SIZES for s in self.sizes), f"sizes must be a non-empty subset of {sorted(SIZES)}")
        lo, hi = self.surface_energy_ratio_range
        _check(0.58 < lo and hi < 1.73, "surface_energy_ratio_range must lie inside (1/√3, √3)")
        lo, hi = self.truncation_range
        _check(0.5 < lo and hi <= 1.0, "truncation_range must lie in (0.5, 1]")
        _check(len(self.class_weights) == 3 and min(self.class_weights) >= 0 and sum(self.class_weights) > 0,
               "class_weights needs three non-negative weights (defect_free, screw, edge), not all zero")
        for name in ("cd_fraction", "invisible_fraction", "gap_probability"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1]")
        _check(0.0 <= self.cd_radius_fraction <= 0.5, "cd_radius_fraction must lie in [0, 0.5]")
        if self.rpd_radius_fraction is not None:
            r = self.rpd_radius_fraction
            _check(isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < r <= 1.0,
                   f"rpd_radius_fraction must be null (anywhere) or lie in (0, 1], got {r!r}")
            object.__setattr__(self, "rpd_radius_fraction", float(r))
        _check(len(self.shape) == 3 and all(int(n) >= 8 and int(n) % 2 == 0 for n in self.shape),
               "shape must be three even sizes >= 8")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        _check(int(self.orientations_per_configuration) >= 1, "orientations_per_configuration must be >= 1")
        _check(self.oversampling_range[0] >= 1.0, "oversampling_range must be >= 1 (2 is the Sayre limit)")
        _check(self.peak_counts_range[0] > 0, "peak_counts_range must be positive")
        _check(self.background_range[0] >= 0, "background_range must be >= 0")
        _check(1 <= self.gap_count_range[0] and self.gap_count_range[1] <= 4, "gap_count_range must lie in [1, 4]")
        _check(self.gap_width_voxels_range[0] >= 1, "gap_width_voxels_range must be >= 1")
        _check(0 <= self.gap_offset_max_voxels <= min(self.shape[1:]) // 2 - 1, "gap_offset_max_voxels too large")
        _check(self.masked_voxel_fraction_range[1] < 1.0 and self.masked_voxel_fraction_range[0] >= 0,
               "masked_voxel_fraction_range must lie in [0, 1)")
        _check(1e-12 < self.nufft_eps <= 1e-3, "nufft_eps must lie in (1e-12, 1e-3]")
        _check(len(self.split_fractions) == 3 and min(self.split_fractions) >= 0
               and abs(sum(self.split_fractions) - 1.0) < 1e-9, "split_fractions must be three fractions summing to 1")
        _check(0 <= int(self.compression_level) <= 9, "compression_level must lie in 0..9")

    # JSON round trip --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "SimulationConfig":
        if not isinstance(d, dict):
            raise BadMessage("simulator config must be a mapping of option names to values")
        d = dict(d)
        version = d.setdefault("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
            raise BadMessage(f"simulator config schema_version {version!r} is not supported "
                             f"(this defectscope reads versions 1 to {SCHEMA_VERSION})")
        while d["schema_version"] < SCHEMA_VERSION:
            d = _PATCHES[d["schema_version"]](d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BadMessage(f"simulator config has unknown options {unknown}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise BadMessage(f"simulator config is malformed: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> "SimulationConfig":
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, BadMessage):
                raise
            raise BadMessage(f"simulator config is not valid JSON: {exc}") from None

    def replace(self, **changes) -> "SimulationConfig":
        return dataclasses.replace(self, **changes)


def load_config(path) -> SimulationConfig:
    """Read a JSON or TOML config file; keys not given keep their defaults."""
    d = read_config_file(path, "simulator config")
    return SimulationConfig.from_dict(d.get("simulate", d) if Path(path).suffix.lower() == ".toml" else d)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BadMessage(message)


def _range(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise BadMessage(f"{name} must be a pair [low, high]") from None
    _check(lo <= hi, f"{name} must satisfy low <= high, got {value!r}")
    return lo, hi


# schema_version N -> N+1 patches; empty while only version 1 exists.
_PATCHES: dict = {}
