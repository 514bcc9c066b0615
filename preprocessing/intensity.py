"""Last two steps: the intensity transform and the normalisation the model was trained with.

The paper divides the centred map by its maximum and feeds the intensity itself (``none`` / ``max``);
``sqrt`` (amplitudes, as 3D-CDI-NN) and ``log1p`` (compresses the fringes' dynamic range) are there for
models trained that way. Which pair applies is read from the model's ``PipelineConfig``, never guessed.
"""

from __future__ import annotations

import numpy as np

from defectscope.errors import LowSignal
from defectscope.preprocessing.config import INTENSITY_TRANSFORMS, NORMALISATIONS, PipelineConfig


def transform_intensity(volume: np.ndarray, transform: str, *, in_place: bool = False) -> np.ndarray:
    """``none`` | ``sqrt`` | ``log1p`` of a non-negative map; float32 (a new array unless ``in_place``)."""
    if transform not in INTENSITY_TRANSFORMS:
        raise ValueError(f"intensity transform must be one of {INTENSITY_TRANSFORMS}, got {transform!r}")
    volume, out = _float32(volume, in_place)
    if transform == "sqrt":
        return np.sqrt(volume, out=out)
    if transform == "log1p":
        return np.log1p(volume, out=out)
    return volume if in_place else volume.copy()


def normalise(volume: np.ndarray, normalisation: str, *, in_place: bool = False) -> np.ndarray:
    """Divide by the maximum (``max``), by the sum (``sum``), or not at all (``none``); float32."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    volume, out = _float32(volume, in_place)
    if normalisation == "none":
        return volume if in_place else volume.copy()
    scale = float(volume.max()) if normalisation == "max" else float(volume.sum(dtype=np.float64))
    if not scale > 0:
        raise LowSignal(f"cannot normalise by the {normalisation}: it is {scale:.6g} (no signal in the window)")
    # A division, not a multiplication by 1/scale, so that the maximum comes out exactly 1.
    return np.divide(volume, np.float32(scale), out=out)


def apply_intensity(volume: np.ndarray, config: PipelineConfig, *, in_place: bool = False) -> np.ndarray:
    """Transform then normalise, as ``config`` says; float32, C-contiguous (a new array unless ``in_place``)."""
    volume = transform_intensity(volume, config.intensity_transform, in_place=in_place)
    # The transform already made a new array when not in place: the normalisation may reuse it.
    return np.ascontiguousarray(normalise(volume, config.normalisation, in_place=True))


def _float32(volume: np.ndarray, in_place: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if in_place:
        if not (isinstance(volume, np.ndarray) and volume.dtype == np.float32):
            raise TypeError("in-place intensity steps need a float32 numpy array")
        return volume, volume
    return np.asarray(volume, dtype=np.float32), None
