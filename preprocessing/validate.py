"""First step of the pipeline: refuse what cannot be a diffraction map, before any work is spent on it.

Two checks, at two moments:

- ``check_declared`` looks only at the *claimed* shape and dtype (a wire header, an HDF5/NPY/TIFF header),
  so an oversized or exotic request is refused before a byte is allocated for it.
- ``check_values`` looks at the numbers: non-finite values, negative counts and maps without signal.

Warnings are plain ``{"reason", "message"}`` dicts (``make_warning``) so they travel unchanged in a
wire reply, a Tango attribute or a CLI line; errors are the ``defectscope.errors`` classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from defectscope.errors import BadMessage, DtypeNotAllowed, LowSignal, NonFinite, ShapeMismatch, TooLarge
from defectscope.preprocessing.config import Limits, PipelineConfig


def make_warning(reason: str, message: str) -> dict:
    """One warning as it appears in a reply: a fixed upper-case reason and one human line."""
    return {"reason": reason, "message": message}


def dtype_code(dtype, *, any_byte_order: bool = False) -> str:
    """The numpy type string (``'<f4'``) of ``dtype``, refused unless it is a plain numeric type.

    With ``any_byte_order`` a big-endian type is reported as its little-endian twin: file formats
    declare their byte order, so ``>f4`` in an HDF5 or TIFF file is unambiguous and is converted on read.
    On the wire the header's string is taken literally.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DtypeNotAllowed(f"dtype {dtype!r} is not a numpy type") from None
    if dt.fields is not None or dt.subdtype is not None or dt.kind not in "biuf":
        raise DtypeNotAllowed(f"dtype {dtype!r} is not a plain numeric type")
    if any_byte_order and dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    return dt.str


def check_declared(
    shape: Sequence[int],
    dtype,
    limits: Limits = Limits(),
    *,
    allow_batch: bool = True,
    any_byte_order: bool = False,
) -> tuple[tuple[int, ...], np.dtype]:
    """Check a claimed map shape and dtype against ``limits``; nothing is allocated.

    ``shape`` is ``[n0, n1, n2]`` (one map) or ``[batch, n0, n1, n2]``. Returns the shape as a tuple of
    ints and the numpy dtype. Raises ``DtypeNotAllowed``, ``ShapeMismatch`` or ``TooLarge``.
    """
    code = dtype_code(dtype, any_byte_order=any_byte_order)
    if code not in limits.allowed_dtypes:
        raise DtypeNotAllowed(f"dtype {code} is not allowed; allowed: {' '.join(limits.allowed_dtypes)}")
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise ShapeMismatch(f"shape must be a list of integers, got {shape!r}")
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape):
        raise ShapeMismatch(f"shape must be a list of integers, got {list(shape)!r}")
    shape = tuple(int(n) for n in shape)
    ranks = (3, 4) if allow_batch else (3,)
    if len(shape) not in ranks:
        wanted = "[n0, n1, n2] or [batch, n0, n1, n2]" if allow_batch else "[n0, n1, n2]"
        raise ShapeMismatch(f"a map has shape {wanted}, got {list(shape)} (rank {len(shape)})")
    if any(n < 1 for n in shape):
        raise ShapeMismatch(f"every size in the shape must be >= 1, got {list(shape)}")
    map_shape = shape[-3:]
    voxels = int(np.prod(map_shape, dtype=np.int64))
    if voxels > limits.max_map_voxels:
        raise TooLarge(f"map of {voxels} voxels {list(map_shape)} exceeds the limit of {limits.max_map_voxels} voxels")
    batch = shape[0] if len(shape) == 4 else 1
    if batch > limits.max_batch:
        raise TooLarge(f"batch of {batch} maps exceeds the limit of {limits.max_batch}")
    nbytes = voxels * batch * np.dtype(code).itemsize
    if nbytes > limits.max_message_bytes:
        raise TooLarge(f"{nbytes} bytes of map data exceed the limit of {limits.max_message_bytes} bytes")
    return shape, np.dtype(code)


# Above this no detector counts, and the pipeline's float32 sums (centre of mass, autocorrelation) over a
# map would overflow: such a map is refused, not prepared into something silently different.
MAX_ABS_VALUE = 1e30


def check_range(low: float, high: float) -> None:
    """Refuse finite values beyond +-MAX_ABS_VALUE (``NonFinite``: out of the range the pipeline computes in)."""
    if max(abs(low), abs(high)) > MAX_ABS_VALUE:
        raise NonFinite(f"map values reach {max(abs(low), abs(high)):.3g}, beyond {MAX_ABS_VALUE:.0e}: out of the "
                        "range the preparation computes in (float32 sums would overflow); rescale the map")


# What the numbers of a map are (SPEC §4 ``input.intensity``): photon counts (the count-based checks apply),
# a scaled intensity (e.g. maximum 1), or an amplitude sqrt(I) (squared before anything else).
INTENSITIES = ("counts", "relative", "amplitude")


def check_intensity(intensity) -> str:
    if intensity not in INTENSITIES:
        raise BadMessage(f"intensity {str(intensity)[:32]!r} is unknown; it is one of {', '.join(INTENSITIES)}")
    return intensity


def relative_warning(config: PipelineConfig, intensity: str) -> dict:
    """The warning of every map whose scale is not photon counts: what is no longer checked."""
    return make_warning(
        "RELATIVE_INTENSITY",
        f"intensities given as {intensity}, not photon counts: the count-based checks (refusal below "
        f"{config.min_peak_counts:g} counts, LOW_COUNTS below {config.low_counts_peak:g}) are not applied, "
        "so a pattern too weak to classify is not detected",
    )


def amplitude_to_intensity(work: np.ndarray) -> np.ndarray:
    """Square an amplitude map in place (float32); an amplitude is never negative."""
    low = float(work.min()) if work.size else 0.0
    if low < 0:
        raise NonFinite(f"amplitude map has negative values down to {low:.6g}: an amplitude sqrt(I) is >= 0")
    with np.errstate(over="ignore"):  # an overflow becomes Inf, which check_values refuses by name
        return np.square(work, out=work)


def check_values(volume: np.ndarray, config: PipelineConfig, *, in_place: bool = False,
                 intensity: str = "counts") -> tuple[np.ndarray, list[dict]]:
    """Check the numbers of one map; return it (small negatives clipped) and the warnings.

    NaN/Inf and deep negatives raise ``NonFinite``; an all-zero or constant map raises ``LowSignal``, and
    so does one of ``counts`` whose maximum is below ``config.min_peak_counts``. The input is not modified
    unless ``in_place``.
    """
    if volume.size == 0:
        raise ShapeMismatch("map is empty")
    # min/max propagate NaN and expose +-Inf, so two reductions replace a full isfinite pass.
    low, high = float(volume.min()), float(volume.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = volume.size - int(np.count_nonzero(np.isfinite(volume)))
        raise NonFinite(f"map has {bad} non-finite voxels (NaN or Inf) of {volume.size}")
    check_range(low, high)
    warnings: list[dict] = []
    if low < 0:
        if high > 0 and -low <= config.negative_clip_fraction * high:
            negatives = int(np.count_nonzero(volume < 0))
            volume = np.maximum(volume, 0, out=volume if in_place else None)
            warnings.append(make_warning(
                "NEGATIVE_CLIPPED",
                f"{negatives} negative voxels (down to {low:.6g}, within {config.negative_clip_fraction:.2%} "
                f"of the maximum {high:.6g}) clipped to 0, as background-subtracted data",
            ))
            low = 0.0
        else:
            raise NonFinite(
                f"map has negative values down to {low:.6g} (maximum {high:.6g}, more than "
                f"{config.negative_clip_fraction:.2%} of it): negative counts are not intensities"
            )
    if high == 0:
        raise LowSignal("map is all zero")
    if high == low:
        raise LowSignal(f"map is constant (every voxel {high:.6g}): no Bragg peak")
    if intensity != "counts":
        warnings.append(relative_warning(config, intensity))
    elif high < config.min_peak_counts:
        hint = ""
        if volume.dtype.kind == "f" and high <= 1:
            hint = ("; if this map is scaled (maximum 1) or holds amplitudes sqrt(I), say so: input.intensity "
                    "'relative' or 'amplitude' (CLI --intensity relative|amplitude, client intensity=...)")
        raise LowSignal(f"map maximum {high:.6g} is below min_peak_counts {config.min_peak_counts:.6g}{hint}")
    return volume, warnings


def check_scan_size(n_frames: int, rows: int, cols: int, limits: Limits, where: str = "scan") -> None:
    """A raw scan's claimed size against the limits, before anything of that size is allocated.

    The one copy of this check: the wire protocol (on the header), the scan loaders (on the file's
    header) and the orthonormaliser (on arrays handed to it directly) all call it.
    """
    if n_frames > limits.max_scan_frames:
        raise TooLarge(f"{where}: {n_frames} frames exceed the limit of {limits.max_scan_frames}")
    if rows * cols > limits.max_frame_pixels:
        raise TooLarge(f"{where}: frames of {rows}x{cols} pixels exceed the limit of {limits.max_frame_pixels} pixels")
    if n_frames * rows * cols > limits.max_scan_voxels:
        raise TooLarge(f"{where}: {n_frames}x{rows}x{cols} exceeds the limit of {limits.max_scan_voxels} voxels")
