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

SCHEMA_VERSION = 3
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
    # Atomistic relaxation (``relax``; version 2) ---------------------------------------------------------
    # This fraction of configurations is built from its cached LAMMPS relaxation (relaxed when missing) at
    # the potential's own lattice constant; the others as before (room-temperature a, Volterra field).
    relaxed_fraction: float = 0.0
    # True: the configurations drawn as relaxed are built as their unrelaxed twins instead (same plan, same
    # draws, the potential's lattice constant, the Volterra field the minimisation starts from).
    relaxed_twin: bool = False
    relax_cache_dir: str | None = None  # None: $DEFECTSCOPE_CACHE/relaxed (or ~/.cache/defectscope/relaxed)
    relax_potentials: tuple[tuple[str, str], ...] = ()  # (element, potential) pairs; () = potentials.CHOSEN
    relax_energy_tolerance: float = 1e-6  # the paper's stopping rule (RelaxationConfig)
    relax_force_tolerance_ev_per_angstrom: float = 0.0
    relax_max_iterations: int = 2000
    # Strain for every class (``strain``; version 2): probability per configuration and the 1st-99th
    # percentile range of the Bragg phase it spans inside the crystal, drawn uniformly in the range.
    interface_strain_probability: float = 0.0  # substrate misfit decaying from the truncation facet
    interface_phase_range_rad: tuple[float, float] = (0.5, 3.0)
    interface_decay_fraction_range: tuple[float, float] = (0.1, 0.5)  # decay length / particle height
    smooth_strain_probability: float = 0.0  # random quadratic + cubic displacement field
    smooth_phase_range_rad: tuple[float, float] = (0.3, 3.0)
    # Sampling ------------------------------------------------------------------------------------
    shape: tuple[int, int, int] = (64, 64, 64)
    orientations_per_configuration: int = 10
    oversampling_range: tuple[float, float] = (2.0, 4.0)
    subpixel_shift: bool = True
    # Detector-frame sampling (``detector_frame``; version 3): this share of patterns is computed at the q of
    # every pixel of a rocking scan in a preset geometry and gridded by the product's orthonormaliser.
    detector_frame_fraction: float = 0.0
    detector_frame_presets: tuple[str, ...] = ("aps-34idc", "esrf-id01", "petra-p10", "soleil-sixs")
    # rocking step / detector-pixel step (lengths in q), log-uniform; the measured beamlines span 0.46-2.7
    # (docs/eval/beamline_sampling.json: q_steps rocking / row)
    detector_frame_rocking_ratio_range: tuple[float, float] = (0.4, 3.0)
    # Noise and detector --------------------------------------------------------------------------
    peak_counts_range: tuple[float, float] = (1e3, 1e6)  # log-uniform
    background_range: tuple[float, float] = (0.0, 0.0)  # mean counts per voxel, flat; (0, 0): none
    gap_probability: float = 0.0  # probability that a pattern has detector-gap stripes
    gap_count_range: tuple[int, int] = (1, 2)
    gap_width_voxels_range: tuple[int, int] = (1, 3)
    gap_offset_max_voxels: int = 12  # stripes start within this many voxels of the centre
    masked_voxel_fraction_range: tuple[float, float] = (0.0, 0.0)
    # Beam and detector nuisances (``detector``; version 2): probability per pattern and ranges.
    coherence_probability: float = 0.0  # partial coherence: intensity blurred by the coherence function's FT
    fringe_visibility_range: tuple[float, float] = (0.5, 1.0)  # per axis, at the crystal's extent
    psf_probability: float = 0.0  # detector point-spread (Gaussian, in the detector plane: axes 1, 2)
    psf_sigma_voxels_range: tuple[float, float] = (0.3, 1.0)
    hot_pixel_probability: float = 0.0  # a hot pixel is a line along the rocking direction (axis 0)
    hot_pixel_count_range: tuple[int, int] = (1, 4)
    hot_pixel_counts_range: tuple[float, float] = (1e2, 1e5)  # counts per voxel, log-uniform
    dead_line_probability: float = 0.0  # a dead detector row/column: a zero plane (constant axis 1 or 2 index)
    dead_line_count_range: tuple[int, int] = (1, 2)
    alien_probability: float = 0.0  # parasitic Bragg spots: compact Gaussian blobs off the peak
    alien_count_range: tuple[int, int] = (1, 3)
    alien_relative_intensity_range: tuple[float, float] = (0.01, 1.0)  # × the peak counts, log-uniform
    alien_sigma_voxels_range: tuple[float, float] = (0.7, 2.0)
    detector_defects_masked_probability: float = 0.0  # hot pixels and dead lines flagged in the mask
    # Numerics ------------------------------------------------------------------------------------
    nufft_eps: float = 1e-5  # NUFFT tolerance (diffraction.DEFAULT_NUFFT_EPS: why this value)
    # Dataset -------------------------------------------------------------------------------------
    split_fractions: tuple[float, float, float] = (0.85, 0.10, 0.05)  # train, validation, test
    compression_level: int = 4  # gzip level of the counts

    def __post_init__(self):
        _check(self.schema_version == SCHEMA_VERSION,
               f"simulator config schema_version must be {SCHEMA_VERSION}, got {self.schema_version!r}")
        for name in ("elements", "sizes", "shape", "class_weights", "split_fractions", "detector_frame_presets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("surface_energy_ratio_range", "truncation_range", "oversampling_range", "peak_counts_range",
                     "background_range", "masked_voxel_fraction_range", *_REALISM_RANGES):
            object.__setattr__(self, name, _range(name, getattr(self, name)))
        for name in ("gap_count_range", "gap_width_voxels_range", "hot_pixel_count_range", "dead_line_count_range",
                     "alien_count_range"):
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
        self._check_realism()
        _check(1e-12 < self.nufft_eps <= 1e-3, "nufft_eps must lie in (1e-12, 1e-3]")
        _check(len(self.split_fractions) == 3 and min(self.split_fractions) >= 0
               and abs(sum(self.split_fractions) - 1.0) < 1e-9, "split_fractions must be three fractions summing to 1")
        _check(0 <= int(self.compression_level) <= 9, "compression_level must lie in 0..9")

    def _check_realism(self) -> None:
        """Version-2 options: relaxation, strain, beam and detector nuisances."""
        for name in _REALISM_PROBABILITIES:
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1]")
        _check(isinstance(self.relaxed_twin, bool), "relaxed_twin must be true or false")
        _check(self.relax_cache_dir is None or isinstance(self.relax_cache_dir, str), "relax_cache_dir must be a path or null")
        try:
            pairs = tuple((str(e), str(n)) for e, n in (self.relax_potentials.items() if isinstance(self.relax_potentials, dict)
                                                         else self.relax_potentials))
        except (TypeError, ValueError):
            raise BadMessage("relax_potentials must be [element, potential] pairs") from None
        object.__setattr__(self, "relax_potentials", tuple(sorted(pairs)))
        object.__setattr__(self, "relax_max_iterations", int(self.relax_max_iterations))
        self.relaxation_config()  # the relaxation config checks tolerances and potential names itself
        for name in ("interface_phase_range_rad", "smooth_phase_range_rad"):
            _check(0.0 <= getattr(self, name)[0] and getattr(self, name)[1] <= 20.0, f"{name} must lie in [0, 20] rad")
        lo, hi = self.interface_decay_fraction_range
        _check(0.01 <= lo and hi <= 5.0, "interface_decay_fraction_range must lie in [0.01, 5]")
        _check(0.0 < self.fringe_visibility_range[0] and self.fringe_visibility_range[1] <= 1.0,
               "fringe_visibility_range must lie in (0, 1]")
        _check(0.0 <= self.psf_sigma_voxels_range[0] and self.psf_sigma_voxels_range[1] <= 5.0,
               "psf_sigma_voxels_range must lie in [0, 5]")
        _check(0.0 < self.hot_pixel_counts_range[0], "hot_pixel_counts_range must be positive")
        _check(0.0 < self.alien_relative_intensity_range[0] and self.alien_relative_intensity_range[1] <= 100.0,
               "alien_relative_intensity_range must lie in (0, 100]")
        _check(0.3 <= self.alien_sigma_voxels_range[0] and self.alien_sigma_voxels_range[1] <= 8.0,
               "alien_sigma_voxels_range must lie in [0.3, 8]")
        from defectscope.training.beamline_sampling import BEAMLINES

        _check(self.detector_frame_presets and all(p in BEAMLINES for p in self.detector_frame_presets),
               f"detector_frame_presets must be a non-empty subset of {sorted(BEAMLINES)}")
        lo, hi = self.detector_frame_rocking_ratio_range
        _check(0.1 <= lo and hi <= 10.0, "detector_frame_rocking_ratio_range must lie in [0.1, 10]")
        for name, most in (("hot_pixel_count_range", 4), ("dead_line_count_range", 2), ("alien_count_range", 3)):
            lo, hi = getattr(self, name)
            _check(1 <= lo and hi <= most, f"{name} must lie in [1, {most}]")

    def relaxation_config(self):
        """The ``relax_config.RelaxationConfig`` these options describe (the stopping rule and potentials)."""
        from defectscope.training.relax_config import RelaxationConfig

        kwargs = {"potentials": self.relax_potentials} if self.relax_potentials else {}
        iterations = int(self.relax_max_iterations)
        try:
            return RelaxationConfig(energy_tolerance=float(self.relax_energy_tolerance),
                                    force_tolerance_ev_per_angstrom=float(self.relax_force_tolerance_ev_per_angstrom),
                                    max_iterations=iterations, max_evaluations=max(20000, 10 * iterations), **kwargs)
        except (TypeError, ValueError) as exc:
            raise BadMessage(f"relaxation options: {exc}") from None

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


_REALISM_RANGES = ("interface_phase_range_rad", "interface_decay_fraction_range", "smooth_phase_range_rad",
                   "fringe_visibility_range", "psf_sigma_voxels_range", "hot_pixel_counts_range",
                   "alien_relative_intensity_range", "alien_sigma_voxels_range", "detector_frame_rocking_ratio_range")
_REALISM_PROBABILITIES = ("relaxed_fraction", "interface_strain_probability", "smooth_strain_probability",
                          "coherence_probability", "psf_probability", "hot_pixel_probability", "dead_line_probability",
                          "alien_probability", "detector_defects_masked_probability", "detector_frame_fraction")


def _patch_v1_to_v2(d: dict) -> dict:
    """Version 2 added relaxation, strain and beam/detector nuisances, all off by default: a version-1 config
    means exactly what it meant (the new options take their defaults)."""
    return {**d, "schema_version": 2}


def _patch_v2_to_v3(d: dict) -> dict:
    """Version 3 added detector-frame sampling, off by default: a version-2 config means what it meant."""
    return {**d, "schema_version": 3}


# schema_version N -> N+1 patches.
_PATCHES: dict = {1: _patch_v1_to_v2, 2: _patch_v2_to_v3}
