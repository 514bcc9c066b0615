"""What a ``Classifier`` is asked to classify, whichever door it came in by.

The ZeroMQ protocol (``server.protocol``) parses a request into a ``Job``; the Tango device and the CLI
make theirs with ``Classifier.classify_map`` / ``classify_scan`` / ``classify_file``. The core knows jobs,
never the wire format.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from defectscope.errors import BadGeometry, BadMessage, ShapeMismatch
from defectscope.preprocessing.config import CANONICAL_AXES
from defectscope.preprocessing.validate import check_intensity


@dataclass
class Job:
    op: str
    request_id: str
    header: dict  # the wire header it came with ({} when made in process): a client-chosen id, the model
    kind: str | None = None  # "map" | "scan" | "file"
    # map(s) [n0,n1,n2] / [B,n0,n1,n2], or scan frames [n,rows,cols]; for a file, what was read from it
    array: np.ndarray | None = None
    frames: list[np.ndarray] | None = None  # scan sent one buffer per frame
    mask: np.ndarray | None = None
    spec: dict = field(default_factory=dict)  # the input's description: axes, voxel_size, geometry, path, ...
    options: dict = field(default_factory=dict)  # return_prepared


# -- jobs made in process (the Tango device, the CLI, scripts) ---------------------------------------------
def _id(request_id: str | None) -> str:
    return request_id or "local-" + uuid.uuid4().hex[:16]


def _options(return_prepared: bool) -> dict:
    return {"return_prepared": bool(return_prepared)}


def _common(intensity, voxel_size, q_direction) -> dict:
    spec = {"intensity": check_intensity(intensity)}
    for key, value in (("voxel_size", voxel_size), ("q_direction", q_direction)):
        if value is not None:
            spec[key] = [float(v) for v in value]
    return spec


def map_job(volume, *, axes=None, voxel_size=None, q_direction=None, intensity: str = "counts",
            request_id: str | None = None, return_prepared: bool = False) -> Job:
    """One map ``[n0,n1,n2]`` (or a batch ``[B,n0,n1,n2]``) in the frame ``axes`` names (default canonical)."""
    volume = np.asarray(volume)
    if volume.ndim not in (3, 4):
        raise ShapeMismatch(f"a map has shape [n0, n1, n2] or [batch, n0, n1, n2], got {list(volume.shape)}")
    spec = {"axes": list(axes or CANONICAL_AXES), **_common(intensity, voxel_size, q_direction)}
    return Job("classify", _id(request_id), {}, kind="map", array=volume, spec=spec, options=_options(return_prepared))


def scan_job(frames, geometry: dict, *, mask=None, intensity: str = "counts", request_id: str | None = None,
             return_prepared: bool = False) -> Job:
    """A raw rocking scan ``[n_frames, rows, cols]`` (or a list of frames) with its geometry (SPEC §4)."""
    if not isinstance(geometry, dict):
        raise BadGeometry("a scan needs its geometry as an object: a preset and/or explicit fields")
    array, frame_list = (frames, None) if isinstance(frames, np.ndarray) else (None, list(frames))
    spec = {"geometry": geometry, **_common(intensity, None, None)}
    return Job("classify", _id(request_id), {}, kind="scan", array=array, frames=frame_list, mask=mask, spec=spec,
               options=_options(return_prepared))


def file_job(path: str, *, dataset: str | None = None, geometry: dict | None = None, axes=None, voxel_size=None,
             q_direction=None, intensity: str = "counts", request_id: str | None = None,
             return_prepared: bool = False) -> Job:
    """A map, or with ``geometry`` a raw scan, in a file under the classifier's data root."""
    if not isinstance(path, str) or not path:
        raise BadMessage("the path must be a non-empty string")
    if dataset is not None and not isinstance(dataset, str):
        raise BadMessage("the dataset must be a string")
    if geometry is not None and not isinstance(geometry, dict):
        raise BadGeometry("geometry must be an object (a preset and/or explicit fields)")
    spec = {"path": path, "dataset": dataset, "geometry": geometry, **_common(intensity, voxel_size, q_direction)}
    if axes is not None:
        spec["axes"] = list(axes)
    return Job("classify", _id(request_id), {}, kind="file", spec=spec, options=_options(return_prepared))


# -- a job in flight, and what comes back ------------------------------------------------------------
@dataclass
class Outcome:
    """A reply header and the extra frames that follow it (the prepared maps, when asked for)."""

    reply: dict
    frames: list = field(default_factory=list)


@dataclass(eq=False)
class _Staged:
    """A request prepared and waiting for its inference (``Classifier._stage``)."""

    request: Job
    prepared: np.ndarray
    warnings: list
    warnings_per: list
    reports: list
    timings: dict
    t0: float
    prior_ms: float = 0.0
    variants: list = field(default_factory=list)  # per map: (oversamplings, [k, *shape] or None)


@dataclass(eq=False)
class ScanStream:
    """A scan being gridded frame by frame (``Classifier.begin_stream``)."""

    request: Job
    state: object  # preprocessing.orthonormalise.StreamState
    frame_shape: tuple[int, int]
    dtype: np.dtype
    gridding_ms: float = 0.0
    decode_ms: float = 0.0
    ahead: object = None  # server.lookahead.Ahead: an answer made before the last frame, while it holds
    ahead_tried_at: int = -1  # frames received when a look-ahead was last made or tried
