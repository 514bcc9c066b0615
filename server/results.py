"""Results log (SPEC §7): one HDF5 row per classification reply, durable as soon as the reply leaves.

Used by both servers (ZeroMQ and Tango). Design choices, and why:

- **One compound dataset** ``/results`` rather than a dataset per column: a row is one resize, one write and
  one flush, so a ``kill -9`` can never leave columns of different lengths.
- **SWMR** (``libver='latest'``, ``swmr_mode=True``): a beamline scientist (silx view, a notebook) can read
  the file while the server writes it. SWMR forbids creating objects after it starts and does not support
  variable-length data, so every column is fixed-size: strings are fixed-width bytes (cut at a UTF-8
  character boundary) and ``probabilities`` is padded with NaN up to ``MAX_CLASSES``.
- **Flush before the reply is sent**: the caller appends, then replies; every reply a client received is
  therefore in the file, whatever happens to the process afterwards. (``flush`` hands the data to the
  kernel, which is what survives a killed process; surviving a power cut would need ``fsync``, too slow per row.)
- **One writer**: HDF5 drops its own file lock once SWMR writing starts (so that readers can open the
  file), which would let a second server write into the same file, or take a live file for a crashed one.
  The writer therefore holds an advisory lock on ``<file>.lock`` (released by the kernel even on ``kill -9``).
- **Recovery**: a file whose writer was killed keeps HDF5's "open for writing" flag, so it opens only
  as a SWMR reader (``read_results`` does that). Opening it again for appending copies its rows into a
  fresh file that then replaces it; no row is lost.

Read it with ``read_results(path)`` or ``h5py.File(path, "r", swmr=True)["results"]``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import threading
import time
from pathlib import Path

import h5py
import numpy as np

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DATASET = "results"
MAX_CLASSES = 8
TIMINGS = ("decode", "orthonormalise", "prepare", "infer", "total")
_CHUNK_ROWS = 64

RESULT_DTYPE = np.dtype([
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


class ResultsLogError(RuntimeError):
    """The results file cannot be used (not ours, wrong schema, locked by another writer, unwritable)."""


def _fit(text, width: int) -> bytes:
    """UTF-8 bytes of ``text`` cut to ``width`` without splitting a character."""
    raw = str(text if text is not None else "").encode("utf-8", "replace")
    if len(raw) <= width:
        return raw
    return raw[:width].decode("utf-8", "ignore").encode("utf-8")


def describe_source(request) -> str:
    """A short description of what a ``protocol.Request`` asked to classify, for the ``source`` column."""
    kind = getattr(request, "kind", None)
    spec = getattr(request, "spec", None) or {}
    if kind == "file":
        dataset = spec.get("dataset")
        where = f"file {spec.get('path')}" + (f"::{dataset}" if dataset else "")
        return where + (" (scan)" if spec.get("geometry") is not None else "")
    if kind in ("map", "scan"):
        array = request.array
        if array is None and request.frames:
            shape, dtype = [len(request.frames), *request.frames[0].shape], request.frames[0].dtype
        elif array is not None:
            shape, dtype = list(array.shape), array.dtype
        else:
            return kind
        preset = (spec.get("geometry") or {}).get("preset") if kind == "scan" else None
        return f"{kind} {shape} {dtype.str}" + (f" preset {preset}" if preset else "")
    return str(kind or "")


class ResultsLog:
    """Append-only, thread-safe HDF5 log; ``append`` returns only after the row is flushed."""

    def __init__(self, path: str | Path, *, server: str = "zmq"):
        self.path = Path(path)
        self.server = server
        self._lock = threading.Lock()
        self.rows_written = 0
        self.failures = 0
        self.last_error: str | None = None
        self._file = None
        self._lock_fd = self._take_writer_lock()
        try:
            self._file = self._open()
            self._ds = self._file[DATASET]
            self._file.swmr_mode = True  # from here on, readers may open the file with swmr=True
        except ResultsLogError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._release_writer_lock()
            raise ResultsLogError(f"results file {str(self.path)!r} cannot be opened for writing: {exc}") from None

    # -- opening ----------------------------------------------------------------------------------
    def _take_writer_lock(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no guard against a second writer
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ResultsLogError(f"cannot create the lock file {str(lock_path)!r}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ResultsLogError(f"results file {str(self.path)!r} is being written by another process "
                                      f"(pid {holder}); give each server its own file") from None
            raise ResultsLogError(f"cannot lock {str(lock_path)!r}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _release_writer_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _open(self) -> h5py.File:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return self._create(self.path)
        try:
            f = h5py.File(self.path, "a", libver="latest")
        except OSError as exc:
            if "already open for write" not in str(exc) and "consistency flags" not in str(exc):
                raise
            # The last writer was killed: its flags say "open for SWMR write". Rows are intact (SWMR).
            self._recover()
            f = h5py.File(self.path, "a", libver="latest")
        self._check_schema(f)
        return f

    def _create(self, path: Path) -> h5py.File:
        f = h5py.File(path, "w", libver="latest")
        f.attrs["defectscope_results_schema"] = SCHEMA_VERSION
        f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["server"] = self.server
        f.attrs["description"] = "defectscope classification replies, one row per map (SPEC §7)"
        f.attrs["columns"] = json.dumps({name: RESULT_DTYPE[name].str for name in RESULT_DTYPE.names})
        f.create_dataset(DATASET, shape=(0,), maxshape=(None,), dtype=RESULT_DTYPE, chunks=(_CHUNK_ROWS,))
        return f

    def _check_schema(self, f: h5py.File) -> None:
        version = f.attrs.get("defectscope_results_schema")
        ds = f.get(DATASET)
        if version != SCHEMA_VERSION or not isinstance(ds, h5py.Dataset) or ds.dtype != RESULT_DTYPE:
            f.close()
            raise ResultsLogError(
                f"{str(self.path)!r} is not a defectscope results file of schema {SCHEMA_VERSION}; "
                "refusing to write into it (choose another ResultsFile / --results)"
            )

    def _recover(self) -> None:
        rows, attrs = _read_rows(self.path)
        tmp = self.path.with_name(self.path.name + ".recovering")
        with self._create(tmp) as f:
            for key in ("created", "server"):
                if key in attrs:
                    f.attrs[key] = attrs[key]
            f.attrs["recovered"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            ds = f[DATASET]
            ds.resize((len(rows),))
            ds[:] = rows
        os.replace(tmp, self.path)
        log.warning("results file %s was not closed cleanly; its %d rows were recovered", self.path, len(rows))

    # -- writing ----------------------------------------------------------------------------------
    def rows(self, reply: dict, *, source: str = "", model: dict | None = None, provider: str | None = None) -> np.ndarray:
        """The rows a reply becomes (several for a batch). ``model``/``provider`` fill in error rows."""
        now = time.time()
        model = reply.get("model") or model or {}
        classes = list(reply.get("classes") or [])[:MAX_CLASSES]
        probabilities = reply.get("probabilities")
        labels = reply.get("label")
        if reply.get("ok") and probabilities and isinstance(probabilities[0], list):
            per_map = list(zip(probabilities, labels))
        else:
            per_map = [(probabilities or [], labels or "")]
        error = reply.get("error") or {}
        timings = reply.get("timings_ms") or {}
        warnings = ",".join(sorted({str(w.get("reason", "")) for w in reply.get("warnings") or [] if isinstance(w, dict)}))
        out = np.zeros(len(per_map), dtype=RESULT_DTYPE)
        for i, (probs, label) in enumerate(per_map):
            row = out[i]
            row["request_id"] = _fit(reply.get("request_id"), 128)
            row["time_unix"] = now
            row["time_iso"] = _fit(_dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="milliseconds"), 32)
            row["server"] = _fit(self.server, 16)
            row["source"] = _fit(source, 256)
            row["ok"] = 1 if reply.get("ok") else 0
            row["error_reason"] = _fit(error.get("reason", ""), 24)
            row["error_message"] = _fit(error.get("message", ""), 256)
            row["index"] = i
            row["label"] = _fit(label, 32)
            row["n_classes"] = len(classes)
            row["classes"] = _fit(",".join(classes), 160)
            padded = np.full(MAX_CLASSES, np.nan, dtype=np.float32)
            padded[: min(len(probs), MAX_CLASSES)] = np.asarray(probs[:MAX_CLASSES], dtype=np.float32)
            row["probabilities"] = padded
            row["model_name"] = _fit(model.get("name"), 64)
            row["model_version"] = _fit(model.get("version"), 64)
            row["model_sha256"] = _fit(model.get("sha256"), 64)
            row["provider"] = _fit(reply.get("provider") or provider, 32)
            for name in TIMINGS:
                row[f"t_{name}_ms"] = float(timings.get(name, np.nan))
            row["warnings"] = _fit(warnings, 256)
        return out

    def append(self, reply: dict, *, source: str = "", model: dict | None = None, provider: str | None = None) -> bool:
        """Write and flush the row(s) of one reply. Never raises: a full disk must not stop the server;
        failures are counted in ``failures`` / ``last_error`` (Tango ALARM, ZeroMQ health) and logged."""
        try:
            rows = self.rows(reply, source=source, model=model, provider=provider)
            with self._lock:
                if self._file is None:
                    raise ResultsLogError("results log is closed")
                n = self._ds.shape[0]
                self._ds.resize((n + len(rows),))
                self._ds[n:] = rows
                self._file.flush()  # before the caller sends the reply: a received reply is a logged reply
                self.rows_written += len(rows)
            return True
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("results log %s: cannot append reply %s: %s", self.path, reply.get("request_id"), exc)
            return False

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()  # a clean close clears the "open for writing" flag
                self._file = None
            self._release_writer_lock()

    def __enter__(self) -> "ResultsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultsLog({str(self.path)!r}, rows_written={self.rows_written})"


# -- reading -------------------------------------------------------------------------------------------
def _read_rows(path: Path, retries: int = 20) -> tuple[np.ndarray, dict]:
    """All rows, opened as a SWMR reader: works while a writer appends and after a writer was killed."""
    for attempt in range(retries):
        try:
            with h5py.File(path, "r", swmr=True) as f:
                ds = f[DATASET]
                ds.refresh()
                return ds[()], dict(f.attrs)
        except OSError:
            # A reader can race the writer's superblock update on open (silx h5py_utils.retry does the same).
            if attempt == retries - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def read_results(path: str | Path) -> list[dict]:
    """The log as a list of dicts (strings decoded, probabilities cut to ``n_classes``)."""
    rows, _ = _read_rows(Path(path))
    out = []
    for row in rows:
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
        out.append(d)
    return out
