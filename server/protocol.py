"""Wire protocol ``defectscope/1`` (SPEC §4): request parsing and reply encoding, no sockets here.

Frames are ``[header, buffer_0, buffer_1, ...]``. The header is checked completely - protocol, op,
kind, dtype against the allow-list, shape against the limits, total bytes - *before* any buffer is
turned into an array, and buffers become arrays only through ``np.frombuffer`` (no copy, never pickle).

Streamed scans (an extension of SPEC §4 kind ``scan``: frames sent as they are measured)
    1. ``{"op": "classify", "request_id": R, "input": {"kind": "scan", "shape": [n, rows, cols], "dtype",
       "geometry", "mask"?, "stream": true}}`` - no frame buffers (the mask buffer, if declared, follows).
    2. One message per frame: ``{"protocol", "op": "frame", "request_id": R, "index": i}`` + one buffer of
       ``rows x cols`` values of the declared dtype, in any order; the last one sent carries ``"last": true``.
    The stream is one request: exactly one reply, the classification after the ``last`` frame (the
    ``timings_ms`` add ``after_last_frame``: from the last frame's arrival to the reply), or the first
    error, which closes the stream (a frame the server cannot use, a missing frame at ``last``, no frame
    for ``Limits.stream_idle_s``, or ``BUSY``: more than ``Limits.max_streams`` open streams or more than
    ``Limits.stream_queue_frames`` frames waiting). Frames are matched to streams by client identity and
    request id; frames of a stream that was already answered are dropped without a reply, a frame for a
    stream never opened gets ``BAD_MESSAGE``. Each frame is gridded on arrival
    (``Orthonormaliser.accumulate_frame``), so after the last one only the box around the peak, the
    preparation and the inference remain.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any, Sequence

import numpy as np

from defectscope import PROTOCOL
from defectscope.errors import (
    BadMessage,
    DefectscopeError,
    DtypeNotAllowed,
    ShapeMismatch,
    TooLarge,
    UnknownOp,
    UnsupportedProtocol,
)
from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.validate import check_intensity, check_scan_size
from defectscope.server.job import Job

OPS = ("classify", "info", "health", "reload", "frame")
KINDS = ("map", "scan", "file")
MAX_HEADER_BYTES = 64 * 1024
MAX_REQUEST_ID = 128
# Spellings accepted for each allowed dtype; anything else is refused without asking numpy to parse it.
DTYPE_ALIASES = {
    "<f4": "<f4", "float32": "<f4", "f4": "<f4",
    "<f8": "<f8", "float64": "<f8", "f8": "<f8",
    "<u2": "<u2", "uint16": "<u2", "u2": "<u2",
    "<u4": "<u4", "uint32": "<u4", "u4": "<u4",
    "<i4": "<i4", "int32": "<i4", "i4": "<i4",
}
MASK_DTYPES = {"|b1": "|b1", "bool": "|b1", "|u1": "|u1", "uint8": "|u1", "u1": "|u1"}
MAP_INPUT_KEYS = {"kind", "shape", "dtype", "axes", "voxel_size", "q_direction", "intensity"}
SCAN_INPUT_KEYS = {"kind", "shape", "dtype", "geometry", "mask", "stream", "intensity"}
FRAME_KEYS = {"protocol", "op", "request_id", "index", "last"}
FILE_INPUT_KEYS = {"kind", "path", "dataset", "geometry", "axes", "q_direction", "voxel_size", "intensity"}
OPTION_KEYS = {"return_prepared"}


# A parsed classify request is the core's job description (its ``spec``: the validated ``input`` object).
Request = Job


def _json_object(raw: bytes) -> dict:
    if len(raw) > MAX_HEADER_BYTES:
        raise TooLarge(f"header frame is {len(raw)} bytes, limit {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadMessage("header frame is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise BadMessage(f"header must be a JSON object, got {type(header).__name__}")
    return header


def peek_request_id(raw: bytes) -> str | None:
    """Best-effort request id of a header that failed to parse, so the error reply can echo it."""
    try:
        header = json.loads(bytes(raw[:MAX_HEADER_BYTES]).decode("utf-8"))
        rid = header.get("request_id") if isinstance(header, dict) else None
        return rid if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID else None
    except Exception:
        return None


def parse_header(raw: bytes) -> tuple[dict, str, str]:
    """Check the envelope of a request: JSON object, protocol, request id, op. Returns (header, id, op)."""
    header = _json_object(raw)
    rid = header.get("request_id")
    if rid is None:
        rid = "srv-" + uuid.uuid4().hex[:16]
    elif not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID:
        raise BadMessage(f"request_id must be a non-empty string of at most {MAX_REQUEST_ID} characters")
    protocol = header.get("protocol")
    if protocol != PROTOCOL:
        if protocol is None:
            raise UnsupportedProtocol(f"header has no 'protocol'; this server speaks {PROTOCOL!r}")
        raise UnsupportedProtocol(f"protocol {str(protocol)[:64]!r} is not supported; this server speaks {PROTOCOL!r}")
    op = header.get("op")
    if op not in OPS:
        raise UnknownOp(f"op {str(op)[:64]!r} is unknown; ops are {', '.join(OPS)}")
    return header, rid, op


def _int_list(value: Any, name: str, lengths: Sequence[int]) -> list[int]:
    if not isinstance(value, list) or len(value) not in lengths:
        raise ShapeMismatch(f"{name} must be a list of {' or '.join(map(str, lengths))} integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ShapeMismatch(f"{name} must hold integers, got {value!r}"[:200])
    if any(v <= 0 for v in value):
        raise ShapeMismatch(f"{name} must hold positive sizes, got {value!r}")
    return value


def _float_list(value: Any, name: str, n: int, *, positive: bool = False) -> list[float]:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok or (positive and any(v <= 0 for v in value)):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise BadMessage(f"{name} must be a list of {n} {kind}")
    return [float(v) for v in value]


def _dtype(value: Any, table: dict, what: str = "dtype") -> np.dtype:
    if not isinstance(value, str) or value not in table:
        allowed = sorted(set(table.values()))
        raise DtypeNotAllowed(f"{what} {str(value)[:32]!r} is not allowed; use one of {allowed}")
    return np.dtype(table[value])


def _check_keys(obj: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BadMessage(f"{where} has unknown keys {unknown}; allowed: {sorted(allowed)}")


def _arrays(buffers: Sequence, shape: list[int], dtype: np.dtype, what: str, split_leading: bool) -> tuple:
    """Arrays from buffers: one buffer of the whole shape, or (split_leading) one buffer per leading index."""
    item_bytes = math.prod(shape[1:]) * dtype.itemsize
    if len(buffers) == 1:
        expected = shape[0] * item_bytes
        if len(buffers[0]) != expected:
            raise ShapeMismatch(
                f"{what} buffer has {len(buffers[0])} bytes; shape {shape} of {dtype.str} needs {expected}"
            )
        return np.frombuffer(buffers[0], dtype=dtype).reshape(shape), None
    if split_leading and len(buffers) == shape[0]:
        for i, b in enumerate(buffers):
            if len(b) != item_bytes:
                raise ShapeMismatch(f"{what} buffer {i} has {len(b)} bytes; one of shape {shape[1:]} needs {item_bytes}")
        return None, [np.frombuffer(b, dtype=dtype).reshape(shape[1:]) for b in buffers]
    raise ShapeMismatch(
        f"{what} needs 1 buffer" + (f" or {shape[0]} (one per frame)" if split_leading else "") + f", got {len(buffers)}"
    )


def parse_classify(header: dict, rid: str, buffers: Sequence, limits: Limits) -> Request:
    """Validate a classify request and view its buffers as arrays; nothing large is allocated."""
    spec = header.get("input")
    if not isinstance(spec, dict):
        raise BadMessage("classify needs an 'input' object")
    options = header.get("options") or {}
    if not isinstance(options, dict):
        raise BadMessage("'options' must be an object")
    _check_keys(options, OPTION_KEYS, "options")
    if not isinstance(options.get("return_prepared", False), bool):
        raise BadMessage("options.return_prepared must be true or false")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise BadMessage(f"input.kind {str(kind)[:32]!r} is unknown; kinds are {', '.join(KINDS)}")
    if spec.get("intensity") is not None:  # absent: "counts"
        check_intensity(spec["intensity"])
    request = Request(op="classify", request_id=rid, header=header, kind=kind, spec=spec, options=options)
    total = sum(len(b) for b in buffers)
    if total > limits.max_message_bytes:
        raise TooLarge(f"request carries {total} bytes, limit {limits.max_message_bytes}")
    if kind == "map":
        _parse_map(request, spec, buffers, limits)
    elif kind == "scan":
        _parse_scan(request, spec, buffers, limits)
    else:
        _check_keys(spec, FILE_INPUT_KEYS, "input")
        if not isinstance(spec.get("path"), str) or not spec["path"]:
            raise BadMessage("input.path must be a non-empty string")
        if spec.get("dataset") is not None and not isinstance(spec["dataset"], str):
            raise BadMessage("input.dataset must be a string")
        if buffers:
            raise ShapeMismatch(f"kind 'file' takes no buffers, got {len(buffers)}")
    return request


def _parse_map(request: Request, spec: dict, buffers: Sequence, limits: Limits) -> None:
    _check_keys(spec, MAP_INPUT_KEYS, "input")
    shape = _int_list(spec.get("shape"), "input.shape", (3, 4))
    dtype = _dtype(spec.get("dtype"), DTYPE_ALIASES)
    voxels = math.prod(shape[-3:])
    batch = shape[0] if len(shape) == 4 else 1
    if voxels > limits.max_map_voxels:
        raise TooLarge(f"map of {shape[-3:]} has {voxels} voxels, limit {limits.max_map_voxels}")
    if batch > limits.max_batch:
        raise TooLarge(f"batch of {batch} maps, limit {limits.max_batch}")
    if batch * voxels * dtype.itemsize > limits.max_message_bytes:
        raise TooLarge(f"shape {shape} of {dtype.str} is {batch * voxels * dtype.itemsize} bytes, limit {limits.max_message_bytes}")
    axes = spec.get("axes")
    if not (isinstance(axes, list) and len(axes) == 3 and all(isinstance(a, str) and a for a in axes)):
        raise BadMessage("input.axes is required: three axis names, e.g. ['q_par', 'q_perp1', 'q_perp2']")
    spec["voxel_size"] = _float_list(spec.get("voxel_size"), "input.voxel_size", 3, positive=True)
    spec["q_direction"] = _float_list(spec.get("q_direction"), "input.q_direction", 3)
    if not buffers:
        raise ShapeMismatch("kind 'map' needs the array as buffer frame(s) after the header")
    array, parts = _arrays(buffers, shape, dtype, "map", split_leading=len(shape) == 4)
    request.array = array if array is not None else np.stack(parts)


def _parse_scan(request: Request, spec: dict, buffers: Sequence, limits: Limits) -> None:
    _check_keys(spec, SCAN_INPUT_KEYS, "input")
    shape = _int_list(spec.get("shape"), "input.shape", (3,))
    dtype = _dtype(spec.get("dtype"), DTYPE_ALIASES)
    spec["dtype"] = dtype.str  # one spelling ("<u2"), whatever alias was sent: the core reads it as is
    n_frames, rows, cols = shape
    check_scan_size(n_frames, rows, cols, limits, where="input.shape")
    if not isinstance(spec.get("geometry"), dict):
        raise BadMessage("kind 'scan' needs an input.geometry object (a preset and/or explicit fields)")
    stream = spec.get("stream", False)
    if not isinstance(stream, bool):
        raise BadMessage("input.stream must be true or false")
    mask_spec = spec.get("mask")
    if mask_spec is not None:
        # The mask is the last buffer: {"shape": [rows, cols] or [n, rows, cols], "dtype": "|u1" or "|b1"}.
        if not isinstance(mask_spec, dict):
            raise BadMessage("input.mask must be an object {shape, dtype}; the mask is the last buffer")
        _check_keys(mask_spec, {"shape", "dtype"}, "input.mask")
        mshape = _int_list(mask_spec.get("shape"), "input.mask.shape", (2, 3))
        if mshape not in ([rows, cols], shape):
            raise ShapeMismatch(f"input.mask.shape {mshape} must be [{rows}, {cols}] or {shape}")
        mdtype = _dtype(mask_spec.get("dtype", "|u1"), MASK_DTYPES, "mask dtype")
        if len(buffers) < (1 if stream else 2):
            raise ShapeMismatch("input.mask is declared but no mask buffer follows the frames")
        (mask, _) = _arrays(buffers[-1:], [1, *mshape], mdtype, "mask", split_leading=False)
        request.mask = mask.reshape(mshape).astype(bool, copy=False)
        buffers = buffers[:-1]
    if stream:
        if buffers:
            raise ShapeMismatch(f"a streamed scan's first message carries no frames (only the mask), got {len(buffers)} buffers; "
                                "send each frame as an op 'frame' message")
        return
    if not buffers:
        raise ShapeMismatch("kind 'scan' needs the frames as buffer frame(s) after the header")
    request.array, request.frames = _arrays(buffers, shape, dtype, "scan", split_leading=True)


def parse_frame(header: dict, buffers: Sequence) -> tuple[int, bool]:
    """Check an ``op: frame`` message of a streamed scan: ``(index, last)``. Its one buffer is sized by the
    stream's first message, so the server checks the size against the open stream."""
    _check_keys(header, FRAME_KEYS, "frame message")
    index, last = header.get("index"), header.get("last", False)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise BadMessage("frame message needs 'index', a non-negative integer")
    if not isinstance(last, bool):
        raise BadMessage("frame 'last' must be true or false")
    if len(buffers) != 1:
        raise ShapeMismatch(f"a frame message carries exactly one buffer (the frame), got {len(buffers)}")
    return index, last


# Replies --------------------------------------------------------------------------------------------
def encode(obj: dict) -> bytes:
    """JSON bytes of a reply; NaN or Inf can never reach a client (allow_nan=False raises instead)."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")


def error_reply(request_id: str | None, exc: DefectscopeError) -> dict:
    return {"protocol": PROTOCOL, "request_id": request_id, "ok": False, "error": exc.to_dict()}
