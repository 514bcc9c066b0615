"""The preparation pipeline: one map in any orthonormal frame -> the model's 64^3 float32 input (SPEC §2).

validate -> mask -> frame conversion -> find the peak -> crop/pad around it (isolated hot voxels
suppressed) -> estimate the oversampling per axis (central peak) and resample per axis onto the trained sampling -> whole-voxel centre
of mass on shape // 2 -> intensity transform -> normalise. Each step is a function of its own module
(validate, frames, centring, oversampling, intensity); this module only composes them.

Transport-free and deterministic: the server, the CLI and the training data path call ``prepare`` with
the model's ``PipelineConfig``, so training and serving prepare maps by the same code and numbers.
Problems that still allow a classification come back as warnings, ``{"reason", "message"}``:

- ``NEGATIVE_CLIPPED``: small negatives (background subtraction) set to 0;
- ``HIGH_MASKED_FRACTION``: more than ``config.masked_fraction_warn`` of the voxels masked;
- ``LOW_COUNTS``: peak below ``config.low_counts_peak``, the class is less certain;
- ``RELATIVE_INTENSITY``: the map is not photon counts (``intensity`` ``relative`` or ``amplitude``, the
  latter squared first): the count-based refusal and ``LOW_COUNTS`` cannot be judged and are not applied;
- ``PEAK_NEAR_EDGE``: peak within ``config.edge_margin`` voxels of a face, part of it is missing;
- ``ISOLATED_VOXELS_SUPPRESSED``: hot pixels / one-voxel aliens near the peak set to their brightest
  neighbour (they would otherwise become the maximum the map is divided by);
- ``OVERSAMPLING_OUT_OF_RANGE``: estimate outside ``config.oversampling_range``, map resampled;
- ``CENTRING_NOT_CONVERGED``: the whole-voxel centre of mass kept moving; the closest window is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from defectscope.errors import DefectscopeError, LowSignal, ShapeMismatch
from defectscope.preprocessing.centring import (
    CentredWindow, centre_of_mass, centre_of_mass_shift, find_peak, isolated_voxels, window_of,
)
from defectscope.preprocessing.config import Limits, PipelineConfig
from defectscope.preprocessing.cut import cut_warning
from defectscope.preprocessing.frames import CANONICAL_AXES, plan_canonical
from defectscope.preprocessing.intensity import apply_intensity
from defectscope.preprocessing.oversampling import (
    crystal_extent_nm, estimate_oversampling, oversampling_warning, resample, resample_factors, undetermined_warning,
)
from defectscope.preprocessing.source import CanonicalSource
from defectscope.preprocessing.validate import (
    amplitude_to_intensity, check_declared, check_intensity, check_range, check_values, make_warning,
)

WARNING_REASONS = (
    "NEGATIVE_CLIPPED", "HIGH_MASKED_FRACTION", "LOW_COUNTS", "PEAK_NEAR_EDGE", "ISOLATED_VOXELS_SUPPRESSED",
    "OVERSAMPLING_OUT_OF_RANGE", "CENTRING_NOT_CONVERGED", "RELATIVE_INTENSITY",
    "SAMPLING_UNDETERMINED",
    # Given by the classifier (server.core), which has the models to compare answers:
    "SAMPLING_SENSITIVE", "MODELS_DISAGREE", "OUT_OF_DISTRIBUTION",
)
# The centre-of-mass search and the resampling read real data beyond the model's window: this fraction
# of the window on every side (the source is re-made around the new centre if that is not enough).
_MARGIN_FRACTION = 8
_RESAMPLE_ATTEMPTS = 3


@dataclass
class Prepared:
    """One prepared map: the model input, the warnings for the reply, and what was done (JSON-ready)."""

    array: np.ndarray  # float32, C-contiguous, config.shape
    warnings: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    # With ``sampling_check``: the same map prepared at other oversamplings across the trained range
    # ([k, *config.shape]), and those oversamplings; the classifier compares its answers on them.
    variants: np.ndarray | None = None
    variant_oversampling: tuple[float, ...] = ()


# Where in the trained range [lo, hi] the sampling check puts a map: lo + f * (hi - lo) for each f
# ([2, 4]: 2.3, 3.0, 3.7). A map's answer should not depend on where in that range it was sampled.
SAMPLING_CHECK_FRACTIONS = (0.15, 0.5, 0.85)


def prepare(
    volume: np.ndarray,
    config: PipelineConfig = PipelineConfig(),
    *,
    axes: Sequence[str] = CANONICAL_AXES,
    q_direction=None,
    voxel_size=None,
    mask: np.ndarray | None = None,
    limits: Limits = Limits(),
    intensity: str = "counts",
    sampling_check: bool = False,
) -> Prepared:
    """Prepare one map (3-D, any allowed dtype) for the model; the input array is never modified.

    ``axes``, ``q_direction``, ``voxel_size`` as in ``frames.plan_canonical``; ``mask`` same shape as
    ``volume``, True (non-zero) = bad voxel, set to 0 before anything else, so masked voxels may hold
    anything (NaN included). ``intensity``: what the numbers are, ``counts`` (photon counts), ``relative``
    (a scaled intensity) or ``amplitude`` (sqrt(I), squared after the mask); the same map given as counts,
    scaled, or as its amplitude is prepared into the same array (the pipeline normalises by the maximum).
    Voxel positions in the report are in the full map after frame conversion. ``sampling_check``: also
    prepare the ``variants`` (``Preparation.sampling_variants``).
    """
    preparation = Preparation(volume, config, axes=axes, q_direction=q_direction, voxel_size=voxel_size,
                              mask=mask, limits=limits, intensity=intensity)
    per_axis, overall = preparation.estimate()
    prepared = preparation.finish(per_axis, overall)
    if sampling_check:
        prepared.variant_oversampling, prepared.variants = preparation.sampling_variants(per_axis)
    return prepared


def sampling_targets(config: PipelineConfig) -> tuple[float, ...]:
    """The oversamplings the sampling check prepares a map at (``Preparation.sampling_variants``); none
    without a trained range."""
    if config.oversampling_range is None:
        return ()
    lo, hi = config.oversampling_range
    return tuple(round(lo + f * (hi - lo), 3) for f in SAMPLING_CHECK_FRACTIONS)


def window_margin(shape) -> np.ndarray:
    """Voxels of real data read beyond the model's window on every side (centring, resampling)."""
    return np.array([max(4, int(n) // _MARGIN_FRACTION) for n in shape])


def source_extent(shape, factor) -> np.ndarray:
    """Voxels per axis of the source a window of ``shape`` reads when resampled by ``factor`` (one number or
    one per axis): the window, its margins, and what a factor < 1 (coarser sampling) pulls in from further out."""
    shape = np.asarray(shape)
    return np.ceil((shape + 2 * window_margin(shape)) / np.minimum(1.0, np.asarray(factor, dtype=np.float64))) + 2


class Preparation:
    """``prepare`` in two halves around the oversampling estimate, which reads only ``window``.

    ``prepare`` runs them in order. The server may instead run ``estimate`` beside ``centre_unresampled``
    and the inference of its result, and keep that result when the estimate asks for no resampling
    (the common case), since then ``finish`` gives the very same map (``tests/test_pipeline.py``).
    """

    def __init__(self, volume, config: PipelineConfig = PipelineConfig(), *, axes: Sequence[str] = CANONICAL_AXES,
                 q_direction=None, voxel_size=None, mask=None, limits: Limits = Limits(), intensity: str = "counts"):
        check_intensity(intensity)
        volume = np.asarray(volume)
        _, dtype = check_declared(volume.shape, volume.dtype, limits, allow_batch=False, any_byte_order=True)
        if dtype.kind == "f" and dtype.itemsize > 4:  # would overflow float32 on the cast: say why, not "Inf"
            low, high = (float(volume.min()), float(volume.max())) if volume.size else (0.0, 0.0)
            if np.isfinite(low) and np.isfinite(high):  # NaN/Inf: reported by check_values below
                check_range(low, high)
        work = np.array(volume, dtype=np.float32, order="C", copy=True)  # our buffer: edited in place below
        warnings: list[dict] = []
        masked = _apply_mask(work, mask, config, warnings)
        if intensity == "amplitude":
            work = amplitude_to_intensity(work)
        work, clipped = check_values(work, config, in_place=True, intensity=intensity)
        warnings += clipped

        shape = config.shape
        margin = window_margin(shape)
        source = CanonicalSource(work, plan_canonical(work.shape, axes, q_direction, voxel_size, max_voxels=limits.max_map_voxels))
        source.start(config, np.asarray(shape) + 2 * margin)
        peak = find_peak(source.array, config)
        if not peak.median_counts > 0:
            raise LowSignal(
                f"no peak wider than one voxel: the brightest voxels ({peak.counts:.6g} counts) are isolated "
                f"(median of their {config.peak_median_size}^3 neighbourhood is 0)"
            )
        peak_index = np.array(peak.index) + source.origin  # full canonical grid from here on
        warnings += _peak_warnings(peak_index, peak.counts, source.plan.out_shape, config,
                                   counts_known=intensity == "counts")

        # A view of the source where the window lies inside it: the hot voxels suppressed in the window
        # are then suppressed in the source too (``_suppress_isolated`` writes both).
        window = window_of(source.array, peak.index, shape)
        isolated = _suppress_isolated(source, window, peak_index, peak.counts, config)
        if isolated:
            warnings.append(isolated)
        cut = None if any(w["reason"] == "PEAK_NEAR_EDGE" for w in warnings) else cut_warning(window, CANONICAL_AXES)
        if cut:
            warnings.append(cut)
        self.config, self.shape, self.margin, self.source = config, shape, margin, source
        self.window, self.peak, self.peak_index, self.warnings = window, peak, peak_index, warnings
        self._input = (list(volume.shape), dtype.str, masked, volume.size, work, intensity)

    def estimate(self) -> tuple[np.ndarray, float]:
        """The oversampling estimate (per axis, overall); reads ``window`` only. Whether each axis was
        resolved is kept for ``finish`` (which runs after this returns, also when this ran in a thread)."""
        per_axis, overall, self._sampling = estimate_oversampling(self.window, self.config, details=True)
        # The report's two passes over the whole map, here too: on the server's helper thread they are
        # off the path to the answer (nothing writes into the map after ``__init__``).
        work = self._input[4]
        self._totals = float(work.max()), float(work.sum(dtype=np.float64))
        return per_axis, overall

    def sampling_variants(self, per_axis) -> tuple[tuple[float, ...], np.ndarray | None]:
        """The map prepared at oversamplings spread across the trained range (``SAMPLING_CHECK_FRACTIONS``):
        ``(targets, [k, *shape])``. With ``config.oversampling_target`` every axis is put on each target (as
        the map itself is on the target); without, the map is scaled by ``target / overall`` on all axes, keeping
        its per-axis ratios.
        The model was trained across that whole range, so a trustworthy answer is the same at each; where it
        is not, the answer depends on how the map happened to be sampled. ``((), None)`` without a range."""
        targets = sampling_targets(self.config)
        per_axis = np.asarray(per_axis, dtype=np.float64)
        if not targets or not np.all(per_axis > 0):
            return (), None
        if self.config.oversampling_target is None:
            per_axis = np.full(3, np.exp(np.log(per_axis).mean()))
        arrays = [
            self._finish_window(*_resample_and_centre(self.source, self.peak_index, t / per_axis, self.shape,
                                                      self.margin)).array
            for t in targets
        ]
        return targets, np.stack(arrays)

    def centre_unresampled(self) -> "_Centred":
        """The centred, normalised window as it is when no resampling is needed."""
        return self._finish_window(*_centre(self.source, self.peak_index, self.shape, self.margin))

    def _finish_window(self, centred: CentredWindow, window_centre) -> "_Centred":
        # The centre of mass for the warning is that of the counts, before the intensity transform.
        com = None if centred.converged else centre_of_mass(centred.array)
        array = apply_intensity(centred.array, self.config, in_place=True)  # the window is ours: no copy
        return _Centred(array, centred, window_centre, com)

    def finish(self, per_axis, overall: float, unresampled: "_Centred | None" = None) -> Prepared:
        """The prepared map for this estimate; ``unresampled`` (from ``centre_unresampled``) is used when
        the estimate needs no resampling, instead of centring again."""
        config, shape, warnings = self.config, self.shape, list(self.warnings)
        factors = resample_factors(per_axis, config)
        if np.all(factors == 1.0):
            done = unresampled if unresampled is not None else self.centre_unresampled()
        else:
            done = self._finish_window(*_resample_and_centre(self.source, self.peak_index, factors, shape, self.margin))
        out_of_range = oversampling_warning(per_axis, factors, config) if config.oversampling_range else None
        if out_of_range is not None:
            warnings.append(out_of_range)
        centred, window_centre = done.centred, done.window_centre
        if done.com is not None:
            warnings.append(make_warning(
                "CENTRING_NOT_CONVERGED",
                f"centre of mass at ({', '.join(f'{c:.2f}' for c in done.com)}) after {centred.iterations} whole-voxel "
                f"re-cuts, not rounding to {[n // 2 for n in shape]}: content entering and leaving the window",
            ))
        input_shape, input_dtype, masked, size, work, intensity = self._input
        peak, source = self.peak, self.source
        sampling = getattr(self, "_sampling", None) or {"resolved": [True] * 3, "confidence": [None] * 3,
                                                        "peak_width_voxels": [None] * 3, "method": None}
        max_counts, total_counts = getattr(self, "_totals", None) or (float(work.max()), float(work.sum(dtype=np.float64)))
        undetermined = undetermined_warning(sampling, config)
        if undetermined is not None:
            warnings.append(undetermined)
        report = {
            "input_shape": input_shape,
            "input_dtype": input_dtype,
            "intensity": intensity,
            "frame": source.info,
            "masked_voxels": masked,
            "masked_fraction": masked / size,
            "max_counts": max_counts,
            "total_counts": total_counts,
            "peak_index": self.peak_index.tolist(),
            "peak_centre": [round(c + o, 3) for c, o in zip(peak.centre, source.origin.tolist())],
            "peak_counts": peak.counts,
            "peak_median_counts": peak.median_counts,
            "oversampling_per_axis": [round(float(s), 3) for s in per_axis],
            # What the oversampling implies (2 pi / (sigma dq)), when the map's voxel size is known.
            "crystal_extent_nm": crystal_extent_nm(per_axis, source.info.get("voxel_size_out")),
            "oversampling_resolved": list(sampling["resolved"]),
            "oversampling_confidence": list(sampling["confidence"]),
            "oversampling_method": sampling["method"],
            "central_peak_width_voxels": list(sampling["peak_width_voxels"]),
            "oversampling": round(overall, 3),
            "resample_factor": [round(float(f), 4) for f in factors],
            "oversampling_after": [round(float(s * f), 3) for s, f in zip(per_axis, factors)],
            "com_shift": list(centred.shift),
            "window_centre": [round(c, 3) for c in window_centre],
            "com_iterations": centred.iterations,
            "com_converged": centred.converged,
            "config_schema_version": config.schema_version,
        }
        return Prepared(done.array, warnings, report)


@dataclass
class _Centred:
    array: np.ndarray  # centred window after the intensity transform: the model input
    centred: CentredWindow
    window_centre: list
    com: np.ndarray | None  # centre of mass of the counts when centring did not converge


def _apply_mask(work: np.ndarray, mask, config: PipelineConfig, warnings: list[dict]) -> int:
    if mask is None:
        return 0
    mask = np.asarray(mask)
    if mask.shape != work.shape:
        raise ShapeMismatch(f"mask shape {list(mask.shape)} does not match the map shape {list(work.shape)}")
    if mask.dtype != bool:
        if mask.dtype.kind not in "biu":
            raise ShapeMismatch(f"mask must be boolean or integer (non-zero = bad voxel), got dtype {mask.dtype}")
        mask = mask != 0
    masked = int(np.count_nonzero(mask))
    if masked == work.size:
        raise LowSignal("every voxel of the map is masked")
    work[mask] = 0
    fraction = masked / work.size
    if fraction > config.masked_fraction_warn:
        warnings.append(make_warning(
            "HIGH_MASKED_FRACTION",
            f"{fraction:.1%} of the voxels are masked ({masked} of {work.size}), above {config.masked_fraction_warn:.0%}",
        ))
    return masked


def _peak_warnings(index: np.ndarray, counts: float, shape: Sequence[int], config: PipelineConfig, *,
                   counts_known: bool = True) -> list[dict]:
    warnings = []
    if counts_known and counts < config.low_counts_peak:
        warnings.append(make_warning(
            "LOW_COUNTS", f"peak of {counts:.6g} counts is below {config.low_counts_peak:.6g}: the class is less certain",
        ))
    distance = int(min(min(i, n - 1 - i) for i, n in zip(index, shape)))
    if distance < config.edge_margin:
        warnings.append(make_warning(
            "PEAK_NEAR_EDGE",
            f"peak at voxel {index.tolist()} of a {list(shape)} map is {distance} voxels from a face "
            f"(margin {config.edge_margin}): part of the pattern is missing and counts as zero",
        ))
    return warnings


def _suppress_isolated(source: CanonicalSource, window: np.ndarray, peak_index, peak_counts: float,
                       config: PipelineConfig) -> dict | None:
    """Remove hot voxels from the window around the peak, and from the source it is re-cut from.

    Judged on the window only (cheap, and what the model sees); the source is this call's own buffer.
    """
    index, brightest = isolated_voxels(window, config.isolated_voxel_floor * peak_counts, config.isolated_voxel_ratio)
    if not len(index):
        return None
    largest = float(window[tuple(index.T)].max())
    window[tuple(index.T)] = brightest
    # Window voxels lie in the source unless they are padding, and padding (zero) is never isolated.
    full_index = index + (np.asarray(peak_index) - np.array([n // 2 for n in window.shape]))
    source.array[tuple(source.local(full_index).T)] = brightest
    source.patches.append((full_index, brightest))
    return make_warning(
        "ISOLATED_VOXELS_SUPPRESSED",
        f"{len(index)} isolated voxels (over {config.isolated_voxel_ratio:g}x every neighbour, up to "
        f"{largest:.6g} counts) set to their brightest neighbour: hot pixels or one-voxel aliens",
    )


def _centre(source: CanonicalSource, peak_index, shape, margin) -> tuple[CentredWindow, list[float]]:
    """Whole-voxel centre of mass from the canonical map (re-made where a region lacks data)."""
    start = np.asarray(peak_index)
    centre = start
    for _ in range(_RESAMPLE_ATTEMPTS):
        # Half the margin on each side: the region was cut around the peak as seen before conversion,
        # which may sit a voxel or two from the peak found after it.
        source.ensure(centre, np.asarray(shape) + margin)
        centred = centre_of_mass_shift(source.array, source.local(centre), shape)
        centre = np.array(centred.centre) + source.origin
        if not source.ensure(centre, np.asarray(shape)):
            break
    shift = tuple(int(v) for v in centre - start)
    return centred._replace(centre=tuple(int(v) for v in centre), shift=shift), [float(c) for c in centre]


def _resample_and_centre(source: CanonicalSource, peak_index, factor: float, shape, margin) -> tuple[CentredWindow, list[float]]:
    """Resample a window (plus margin) around the peak, then centre on whole voxels of the new grid."""
    source_shape = tuple(int(n) for n in np.asarray(shape) + 2 * margin)
    source_mid = np.array([n // 2 for n in source_shape])
    centre = np.array(peak_index, dtype=np.float64)
    for _ in range(_RESAMPLE_ATTEMPTS):
        # The canonical data the resampled window reads: its extent in canonical voxels, plus the rim.
        source.ensure(np.floor(centre + 0.5).astype(int), np.ceil(np.asarray(source_shape) / factor).astype(int) + 4)
        resampled = resample(source.array, factor, centre=source.local(centre), shape=source_shape)
        centred = centre_of_mass_shift(resampled, source_mid, shape)
        offset = np.array(centred.centre) - source_mid
        if np.all(np.abs(offset) <= margin):
            break
        # The centre of mass wandered past the margin, where the resampled source has no data: re-make it there.
        centre = centre + np.round(offset) / factor
    window_centre = (centre + offset / factor).tolist()
    shift = np.round((np.array(window_centre) - np.asarray(peak_index)) * factor).astype(int)
    return centred._replace(shift=tuple(int(s) for s in shift)), window_centre


def prepare_batch(volumes, config: PipelineConfig = PipelineConfig(), *, mask=None, limits: Limits = Limits(),
                  **kwargs) -> tuple[np.ndarray, list[list[dict]], list[dict]]:
    """Prepare ``[B, n0, n1, n2]`` maps (or a sequence of 3-D maps) with the same frame keywords.

    ``mask`` is None, one 3-D mask for every map, or one per map. Returns the ``[B, *config.shape]``
    float32 batch, the warnings per map and the reports per map. A bad map fails the batch with its
    own error class, the message saying which map.
    """
    if isinstance(volumes, np.ndarray):
        check_declared(volumes.shape, volumes.dtype, limits, allow_batch=True, any_byte_order=True)
        if volumes.ndim == 3:
            volumes = volumes[None]
    else:
        volumes = list(volumes)
        if len(volumes) > limits.max_batch:
            check_declared([len(volumes), 1, 1, 1], "<f4", limits)  # raises TooLarge with the numbers
    n = len(volumes)
    if mask is not None:
        mask = np.asarray(mask)
        masks = list(mask) if mask.ndim == 4 else [mask] * n
        if len(masks) != n:
            raise ShapeMismatch(f"{len(masks)} masks for {n} maps")
    else:
        masks = [None] * n
    each = prepare_each(volumes, config, masks=masks, limits=limits, **kwargs)
    return np.stack([p.array for p in each]), [p.warnings for p in each], [p.report for p in each]


def prepare_each(volumes, config: PipelineConfig, *, masks=None, limits: Limits = Limits(), name_the_map: bool = True,
                 **kwargs) -> list[Prepared]:
    """``prepare`` every map of a batch with the same keywords (``masks``: one per map, or None): the one
    loop behind ``prepare_batch`` and the server's batches. A bad map fails the batch with its own error
    class, the message saying which map (``name_the_map``)."""
    n = len(volumes)
    masks = [None] * n if masks is None else masks
    out = []
    for i in range(n):
        try:
            out.append(prepare(volumes[i], config, mask=masks[i], limits=limits, **kwargs))
        except DefectscopeError as exc:
            if not name_the_map:
                raise
            raise type(exc)(f"map {i} of {n}: {exc.message}") from exc
    return out
