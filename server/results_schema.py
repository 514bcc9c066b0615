"""The row schema of the results log (SPEC §7): its columns, and how a reply becomes rows and rows a dict.

SWMR does not support variable-length data, so every column is fixed-size: strings are fixed-width bytes
(cut at a UTF-8 character boundary), ``probabilities`` is padded with NaN up to ``MAX_CLASSES``, and the
JSON reply is cut into ``REPLY_PIECE_BYTES`` pieces, one per row of the reply (a batch has a row per map).
Schema 2 only added columns to schema 1 (``request_digest``, ``replayed``, ``reply_json``); ``to_current``
brings rows of either into the current dtype. ``server/results.py`` keeps these rows in the HDF5 file.
"""

from __future__ import annotations

import datetime as _dt
import json
import time

import numpy as np

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)        # schema 1: the same columns without reply_json, request_digest, replayed
DATASET = "results"
MAX_CLASSES = 8
TIMINGS = ("decode", "orthonormalise", "prepare", "infer", "total")
REPLY_PIECE_BYTES = 4096         # reply_json bytes per row (a one-map reply is ~1.4 kB; a batch has a row per map)

RESULT_DTYPE_V1 = np.dtype([
    ("request_id", "S128"),
    ("time_unix", "<f8"),        # seconds since the epoch, UTC, when the reply was logged
    ("time_iso", "S32"),         # the same instant, ISO 8601, for humans browsing the file
    ("server", "S16"),           # "zmq" | "tango" | "cli"
    ("source", "S256"),          # what was classified: "map [64, 64, 64] <f4", "file run1/map.h5::/entry/data"
    ("ok", "u1"),
    ("error_reason", "S24"),     # a SPEC §4 reason when ok == 0
    ("error_message", "S256"),
    ("index", "<i4"),            # position in a batch reply (0 for one map)
    ("label", "S32"),
    ("n_classes", "u1"),
    ("classes", "S160"),         # comma separated, in the order of `probabilities`
    ("probabilities", "<f4", (MAX_CLASSES,)),
    ("model_name", "S64"),
    ("model_version", "S64"),
    ("model_sha256", "S64"),
    ("provider", "S32"),
    *[(f"t_{name}_ms", "<f4") for name in TIMINGS],
    ("warnings", "S256"),        # comma-separated warning reasons
])

RESULT_DTYPE = np.dtype(RESULT_DTYPE_V1.descr + [
    ("request_digest", "S32"),   # sha256 (first 128 bits, hex) of the request's input, options and buffers
    ("replayed", "u1"),          # 1: this reply was given again from an earlier row, not computed
    ("reply_json", f"S{REPLY_PIECE_BYTES}"),  # the JSON reply as sent (split over a batch's rows); empty if replayed
])


def fit(text, width: int) -> bytes:
    """UTF-8 bytes of ``text`` cut to ``width`` without splitting a character."""
    raw = str(text if text is not None else "").encode("utf-8", "replace")
    if len(raw) <= width:
        return raw
    return raw[:width].decode("utf-8", "ignore").encode("utf-8")


# -- a reply -> rows --------------------------------------------------------------------------------
def _per_map(reply: dict) -> list[tuple[list, str]]:
    """``(probabilities, label)`` of each map of a reply: several for an ok batch, else one."""
    probabilities = reply.get("probabilities")
    labels = reply.get("label")
    if reply.get("ok") and probabilities and isinstance(probabilities[0], list):
        return list(zip(probabilities, labels))
    return [(probabilities or [], labels or "")]


def reply_rows(reply: dict, *, server: str, source: str = "", model: dict | None = None,
               provider: str | None = None, digest: str | None = None, replayed: bool = False) -> np.ndarray:
    """The rows of ``reply`` (one per map), every column but ``reply_json`` (``put_reply_json``).
    ``model``/``provider`` fill in error rows, which do not name them."""
    now = time.time()
    model = reply.get("model") or model or {}
    classes = list(reply.get("classes") or [])[:MAX_CLASSES]
    per_map = _per_map(reply)
    error = reply.get("error") or {}
    timings = reply.get("timings_ms") or {}
    warnings = ",".join(sorted({str(w.get("reason", "")) for w in reply.get("warnings") or [] if isinstance(w, dict)}))
    out = np.zeros(len(per_map), dtype=RESULT_DTYPE)
    for i, (probs, label) in enumerate(per_map):
        row = out[i]
        row["request_id"] = fit(reply.get("request_id"), 128)
        row["time_unix"] = now
        row["time_iso"] = fit(_dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="milliseconds"), 32)
        row["server"] = fit(server, 16)
        row["source"] = fit(source, 256)
        row["ok"] = 1 if reply.get("ok") else 0
        row["error_reason"] = fit(error.get("reason", ""), 24)
        row["error_message"] = fit(error.get("message", ""), 256)
        row["index"] = i
        row["label"] = fit(label, 32)
        row["n_classes"] = len(classes)
        row["classes"] = fit(",".join(classes), 160)
        padded = np.full(MAX_CLASSES, np.nan, dtype=np.float32)
        padded[: min(len(probs), MAX_CLASSES)] = np.asarray(probs[:MAX_CLASSES], dtype=np.float32)
        row["probabilities"] = padded
        row["model_name"] = fit(model.get("name"), 64)
        row["model_version"] = fit(model.get("version"), 64)
        row["model_sha256"] = fit(model.get("sha256"), 64)
        row["provider"] = fit(reply.get("provider") or provider, 32)
        for name in TIMINGS:
            row[f"t_{name}_ms"] = float(timings.get(name, np.nan))
        row["warnings"] = fit(warnings, 256)
        row["request_digest"] = fit(digest or "", 32)
        row["replayed"] = 1 if replayed else 0
    return out


def reply_json(reply: dict) -> bytes:
    """The reply as sent, compact JSON (ASCII: it holds no NUL, so no piece loses a trailing byte)."""
    return json.dumps(reply, allow_nan=False, separators=(",", ":")).encode("utf-8")


def put_reply_json(rows: np.ndarray, text: bytes) -> bool:
    """Cut ``text`` (``reply_json``) over the ``reply_json`` column of ``rows``, in order; False, with
    nothing written, when it is longer than they hold."""
    if len(text) > len(rows) * REPLY_PIECE_BYTES:
        return False
    for i in range(len(rows)):
        rows[i]["reply_json"] = text[i * REPLY_PIECE_BYTES:(i + 1) * REPLY_PIECE_BYTES]
    return True


# -- rows -> dicts ----------------------------------------------------------------------------------
def to_current(rows: np.ndarray) -> np.ndarray:
    """Rows of any readable schema in the current ``RESULT_DTYPE`` (columns a schema lacks are empty)."""
    if rows.dtype == RESULT_DTYPE:
        return rows
    out = np.zeros(rows.shape, dtype=RESULT_DTYPE)
    for name in rows.dtype.names:
        if name in RESULT_DTYPE.names:
            out[name] = rows[name]
    return out


def _joined_reply(rows: np.ndarray, k: int) -> dict | None:
    """The JSON reply whose first piece is on row ``k`` (its pieces joined), or None when it has none."""
    row = rows[k]
    if row["index"] != 0 or not row["reply_json"]:
        return None
    text, j = bytes(row["reply_json"]), k + 1
    while j < len(rows) and rows[j]["index"] == j - k and rows[j]["request_id"] == row["request_id"]:
        text += bytes(rows[j]["reply_json"])
        j += 1
    try:
        return json.loads(text.decode("utf-8"))
    except ValueError:  # cut short: an oversized reply of an older writer
        return None


def row_dicts(rows: np.ndarray) -> list[dict]:
    """Rows of the current schema as dicts (strings decoded, probabilities cut to ``n_classes``, ``reply``
    joined on the first row of each reply: see ``results.read_results``)."""
    out = []
    for k, row in enumerate(rows):
        d = {}
        for name in RESULT_DTYPE.names:
            value = row[name]
            d[name] = value.decode("utf-8") if isinstance(value, bytes) else value
        n = int(row["n_classes"])
        d["ok"] = bool(row["ok"])
        d["classes"] = d["classes"].split(",") if d["classes"] else []
        d["probabilities"] = [float(v) for v in row["probabilities"][:n]] if d["ok"] else []
        d["time_unix"] = float(row["time_unix"])
        d["index"] = int(row["index"])
        d["n_classes"] = n
        for name in TIMINGS:
            d[f"t_{name}_ms"] = float(row[f"t_{name}_ms"])
        d["replayed"] = bool(row["replayed"])
        d["reply"] = _joined_reply(rows, k)
        out.append(d)
    return out
