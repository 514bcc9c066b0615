"""The one source of preprocessing parameters: a frozen, versioned ``PipelineConfig``.

Training writes it into the ONNX file (``defectscope.pipeline`` metadata); serving reads it back from
there, so the data a model was trained on and the data it is served are prepared by the same numbers.

Older schema versions are patched forward one step at a time (``_PATCHES``); a version newer than this
code knows is refused, because silently ignoring new fields would change the preparation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from defectscope.errors import BadMessage

# The canonical frame's axis names (SPEC §2), defined once here, in a module light enough for the client.
CANONICAL_AXES = ("q_par", "q_perp1", "q_perp2")

SCHEMA_VERSION = 2

INTENSITY_TRANSFORMS = ("none", "sqrt", "log1p")
NORMALISATIONS = ("max", "sum", "none")


@dataclass(frozen=True)
class PipelineConfig:
    """Parameters of validate → mask → crop/pad → resample → centre → transform → normalise (SPEC §2)."""

    schema_version: int = SCHEMA_VERSION
    # Model input: one map of this shape, float32, canonical frame (axis 0 along Q).
    shape: tuple[int, int, int] = (64, 64, 64)
    # Peak finding: the maximum after a median filter of this size (an isolated hot voxel or a
    # one-voxel alien cannot win), then centre-of-mass refinement in a box of this half-width.
    peak_median_size: int = 3
    peak_com_halfwidth: int = 4
    # Oversampling ratio (per axis, real-space field of view / object size) the model was trained on.
    # With ``oversampling_target`` None, each axis outside this range is resampled to its nearest bound;
    # None disables resampling (and the sampling check).
    oversampling_range: tuple[float, float] | None = (2.0, 4.0)
    # Schema 2: every map is resampled, axis by axis, to this oversampling (inside ``oversampling_range``),
    # so the network sees one sampling whatever grid the data came on; None: only axes out of range move.
    oversampling_target: float | None = None
    # Schema 2: the oversampling is estimated from the central peak's width (``oversampling``): its
    # curvature-fitted width in voxels is this fraction of the oversampling on the simulator's crystals
    # (calibrated by ``python -m defectscope.training.sampling_calibration``, docs/eval/sampling_estimators.json).
    central_peak_ratio: float = 0.50
    # Intensity transform applied after centring, then normalisation.
    intensity_transform: str = "none"
    normalisation: str = "max"
    # Signal checks on the raw map: below min_peak_counts the request fails with LOW_SIGNAL,
    # below low_counts_peak it is classified with a LOW_COUNTS warning.
    min_peak_counts: float = 10.0
    low_counts_peak: float = 1000.0
    # A peak closer than this to a face of the input map raises PEAK_NEAR_EDGE.
    edge_margin: int = 8
    # Background-subtracted data may dip slightly below zero: negatives down to this fraction of the
    # maximum are clipped to 0 (NEGATIVE_CLIPPED warning); deeper ones fail with NON_FINITE.
    negative_clip_fraction: float = 0.01
    # More than this fraction of masked voxels raises HIGH_MASKED_FRACTION.
    masked_fraction_warn: float = 0.2
    # A voxel more than isolated_voxel_ratio times brighter than each of its six face neighbours (and
    # than one count), and above isolated_voxel_floor of the peak, is a hot pixel or one-voxel alien,
    # not Bragg diffraction (a peak sampled at oversampling >= ~1.2 never is): it is set to its
    # brightest neighbour.
    isolated_voxel_ratio: float = 50.0
    isolated_voxel_floor: float = 0.01

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise BadMessage(
                f"pipeline config schema_version {self.schema_version!r} is not supported "
                f"(this defectscope reads versions up to {SCHEMA_VERSION})"
            )
        if len(self.shape) != 3 or any(int(n) < 8 for n in self.shape):
            raise BadMessage(f"pipeline shape must be three sizes >= 8, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if self.oversampling_range is not None:
            lo, hi = (float(v) for v in self.oversampling_range)
            if not 1.0 <= lo <= hi:
                raise BadMessage(f"oversampling_range must satisfy 1 <= low <= high, got {self.oversampling_range!r}")
            object.__setattr__(self, "oversampling_range", (lo, hi))
        if self.oversampling_target is not None:
            t = self.oversampling_target
            ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
            rng = self.oversampling_range
            if not ok or rng is None or not rng[0] <= t <= rng[1]:
                raise BadMessage(f"oversampling_target must be a number inside oversampling_range {rng!r}, got {t!r}")
            object.__setattr__(self, "oversampling_target", float(t))
        if self.intensity_transform not in INTENSITY_TRANSFORMS:
            raise BadMessage(f"intensity_transform must be one of {INTENSITY_TRANSFORMS}, got {self.intensity_transform!r}")
        if self.normalisation not in NORMALISATIONS:
            raise BadMessage(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        self._check_numbers()

    def _check_numbers(self):
        """Every numeric field in its valid range, so a bad config fails here and not mid-pipeline."""

        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BadMessage(f"pipeline config {name} must be an integer >= {low}, got {value!r}")

        def number(name, low, high, *, open_low=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok:
                ok = (value > low if open_low else value >= low) and value <= high
            if not ok:
                bracket = "(" if open_low else "["
                raise BadMessage(f"pipeline config {name} must be a number in {bracket}{low}, {high}], got {value!r}")
            object.__setattr__(self, name, float(value))

        integer("peak_median_size", 1)
        if self.peak_median_size % 2 == 0:
            raise BadMessage(f"pipeline config peak_median_size must be odd, got {self.peak_median_size}")
        integer("peak_com_halfwidth", 1)
        integer("edge_margin", 0)
        number("central_peak_ratio", 0.05, 2.0)
        number("min_peak_counts", 0.0, math.inf)
        number("low_counts_peak", 0.0, math.inf)
        number("negative_clip_fraction", 0.0, 1.0)
        number("masked_fraction_warn", 0.0, 1.0)
        number("isolated_voxel_ratio", 2.0, 1e12)
        number("isolated_voxel_floor", 0.0, 1.0)

    # JSON round trip ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        if self.oversampling_range is not None:
            d["oversampling_range"] = list(self.oversampling_range)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        if not isinstance(d, dict):
            raise BadMessage("pipeline config must be a JSON object")
        version = d.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BadMessage("pipeline config has no integer schema_version")
        if version > SCHEMA_VERSION or version < 1:
            raise BadMessage(
                f"pipeline config schema_version {version} is not supported "
                f"(this defectscope reads versions 1 to {SCHEMA_VERSION})"
            )
        d = dict(d)
        while d["schema_version"] < SCHEMA_VERSION:
            d = _PATCHES[d["schema_version"]](d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BadMessage(f"pipeline config has unknown fields {unknown}")
        if d.get("shape") is not None:
            d["shape"] = tuple(d["shape"])
        if d.get("oversampling_range") is not None:
            d["oversampling_range"] = tuple(d["oversampling_range"])
        try:
            return cls(**d)
        except TypeError as exc:
            raise BadMessage(f"pipeline config is malformed: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> "PipelineConfig":
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadMessage(f"pipeline config is not valid JSON: {exc}") from None
        return cls.from_dict(d)


def _v1_to_v2(d: dict) -> dict:
    """Schema 1 estimated the oversampling from the autocorrelation's support (``oversampling_threshold``)
    and resampled all axes by one factor; schema 2 estimates it from the central peak and resamples per
    axis. A v1 model keeps its trained range, without a fixed target (only axes out of range move)."""
    d = {k: v for k, v in d.items() if k != "oversampling_threshold"}
    d["schema_version"] = 2
    return d


# schema_version N -> N+1 patches.
_PATCHES: dict = {1: _v1_to_v2}


@dataclass(frozen=True)
class Limits:
    """Sizes a request may claim, checked against the header before anything is allocated."""

    max_message_bytes: int = 512 * 1024 * 1024
    max_map_voxels: int = 256**3
    max_batch: int = 64
    max_scan_frames: int = 2048
    max_frame_pixels: int = 2048 * 2048
    max_scan_voxels: int = 2048 * 512 * 512
    allowed_dtypes: tuple[str, ...] = ("<f4", "<f8", "<u2", "<u4", "<i4")
    queue_length: int = 16
    # Streamed scans (frames sent one message each, see server.protocol): open at once, seconds a stream
    # may wait for its next frame, frames waiting to be gridded (all streams together).
    max_streams: int = 4
    stream_idle_s: float = 60.0
    stream_queue_frames: int = 512


def read_config_file(path, what: str = "config", tables=None) -> dict:
    """A JSON or TOML config file (by its suffix) as a dict, the one reader of the project's config files
    (``training.sim_config.load_config``, ``training.train.load_run_config``). A missing, unreadable or
    malformed file, or a top-level key outside ``tables`` (when given), is one ``BadMessage`` line."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise BadMessage(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    toml = path.suffix.lower() == ".toml"
    try:
        d = tomllib.loads(text.decode()) if toml else json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise BadMessage(f"{what} {str(path)!r} is not valid {'TOML' if toml else 'JSON'}: {exc}") from None
    if not isinstance(d, dict):
        raise BadMessage(f"{what} {str(path)!r} must hold an object (a table), not {type(d).__name__}")
    if tables is not None and set(d) - set(tables):
        raise BadMessage(f"{what} {str(path)!r} must hold only {' and/or '.join(repr(t) for t in tables)} tables")
    return d
