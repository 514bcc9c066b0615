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

- **The whole reply, too** (schema 2): ``reply_json`` holds the JSON reply exactly as sent (a batch's reply is
  cut into the ``reply_json`` of its rows, in order: join them), so a reply can be given again after a
  restart. ``request_digest`` fingerprints what was asked and who answered (the ``input`` object, the data
  bytes, the model's name, version and sha256) and
  ``replayed`` marks rows of replies that were given again rather than computed. Columns were only added:
  schema-1 readers still find every column they know, and a schema-1 file opened for appending is copied
  into schema 2 (its old rows keep an empty ``reply_json``). The dataset is gzip-compressed (level 1,
  16-row chunks): the padded text columns shrink to a fraction, and a row costs ~0.3 ms to write.
- **Idempotent request ids** (SPEC §4 retries): ``replay(request_id, digest)`` returns the recorded ``ok``
  reply of a client-chosen request id when the new request has the same digest; the ZeroMQ server sends it
  again (``"replayed": true``) instead of classifying twice, so a client may retry any id after a timeout or a
  ``kill -9`` of the server. The index (request id -> rows, digest) lives in memory, bounded to the last
  ``replay_window`` ids (default 100 000, ~35 MB); at start it is rebuilt from the last ``replay_window``
  rows of the file. Only ``ok`` replies are indexed (an error such as ``BUSY`` must be retryable), and only
  requests that chose their own ``request_id``. A request id reused with a different payload (another scan
  under the name ``scan-0054``) is classified anew, and the index then points to the new reply; so is a
  retry after a reload or a restart with another model, and a file request whose file now holds other bytes.

Read it with ``read_results(path)`` or ``h5py.File(path, "r", swmr=True)["results"]``.

This module is the file: its lock, opening, recovery, the replay index, appending and reading. The
columns and how a reply becomes rows are in ``results_schema``; what identifies a request (``replayable``,
``request_digest``, ``describe_source``) is in ``fingerprint``. Both are imported from here as before.
"""

from __future__ import annotations

import collections
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

# Re-exported (``__all__``): callers import these names from the module of the log.
from defectscope.server.fingerprint import describe_source, replayable, request_digest
from defectscope.server.results_schema import (
    DATASET, MAX_CLASSES, READABLE_SCHEMAS, REPLY_PIECE_BYTES, RESULT_DTYPE, RESULT_DTYPE_V1, SCHEMA_VERSION, TIMINGS,
    put_reply_json, reply_json, reply_rows, row_dicts, to_current,
)

__all__ = [
    "DATASET", "DEFAULT_REPLAY_WINDOW", "MAX_CLASSES", "READABLE_SCHEMAS", "REPLY_PIECE_BYTES", "RESULT_DTYPE",
    "RESULT_DTYPE_V1", "SCHEMA_VERSION", "TIMINGS", "ResultsLog", "ResultsLogError", "describe_source",
    "read_results", "replayable", "request_digest",
]

log = logging.getLogger(__name__)

DEFAULT_REPLAY_WINDOW = 100_000  # request ids whose reply can be given again (memory: ~350 bytes each)
_CHUNK_ROWS = 16
_COPY_BLOCK = 4096               # rows per block when a file is rewritten (recovery, schema migration)


class ResultsLogError(RuntimeError):
    """The results file cannot be used (not ours, wrong schema, locked by another writer, unwritable)."""



class ResultsLog:
    """Append-only, thread-safe HDF5 log; ``append`` returns only after the row is flushed.

    ``replay_window``: how many client-chosen request ids keep a reply that ``replay`` can give again
    (the most recent ones; 0 turns the index off)."""

    def __init__(self, path: str | Path, *, server: str = "zmq", replay_window: int = DEFAULT_REPLAY_WINDOW):
        self.path = Path(path)
        self.server = server
        self.replay_window = max(0, int(replay_window))
        self._lock = threading.Lock()
        self.rows_written = 0
        self.failures = 0
        self.last_error: str | None = None
        # request id -> (first row, number of rows, request digest) of its last ok reply, oldest first.
        self._index: collections.OrderedDict[str, tuple[int, int, str]] = collections.OrderedDict()
        self._file = None
        self._lock_fd = self._take_writer_lock()
        try:
            self._file = self._open()
            self._ds = self._file[DATASET]
            self._load_index()
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
            self._rewrite("recovered")
            f = h5py.File(self.path, "a", libver="latest")
        if self._schema_of(f) == 1:  # an older server's file: copy its rows into the current schema
            f.close()
            self._rewrite("migrated_from_schema_1")
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
        f.create_dataset(DATASET, shape=(0,), maxshape=(None,), dtype=RESULT_DTYPE, chunks=(_CHUNK_ROWS,),
                         compression="gzip", compression_opts=1)
        return f

    @staticmethod
    def _schema_of(f: h5py.File) -> int | None:
        version = f.attrs.get("defectscope_results_schema")
        ds = f.get(DATASET)
        if version == 1 and isinstance(ds, h5py.Dataset) and ds.dtype == RESULT_DTYPE_V1:
            return 1
        return int(version) if version is not None and np.ndim(version) == 0 else None

    def _check_schema(self, f: h5py.File) -> None:
        version = f.attrs.get("defectscope_results_schema")
        ds = f.get(DATASET)
        if version != SCHEMA_VERSION or not isinstance(ds, h5py.Dataset) or ds.dtype != RESULT_DTYPE:
            f.close()
            raise ResultsLogError(
                f"{str(self.path)!r} is not a defectscope results file of schema {SCHEMA_VERSION}; "
                "refusing to write into it (choose another ResultsFile / --results)"
            )

    def _rewrite(self, why: str) -> None:
        """Copy every row into a fresh file of the current schema that then replaces the old one: after a
        ``kill -9`` (``why='recovered'``) or for a file of an older schema. Read as a SWMR reader, in blocks."""
        tmp = self.path.with_name(self.path.name + ".recovering")
        for attempt in range(20):
            try:
                src = h5py.File(self.path, "r", swmr=True)
                break
            except OSError:  # a reader can race a superblock update (see _read_rows)
                if attempt == 19:
                    raise
                time.sleep(0.05)
        with src, self._create(tmp) as f:
            old = src[DATASET]
            old.refresh()
            for key in ("created", "server", "recovered", "migrated_from_schema_1"):
                if key in src.attrs:
                    f.attrs[key] = src.attrs[key]
            f.attrs[why] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            n = old.shape[0]
            ds = f[DATASET]
            ds.resize((n,))
            for start in range(0, n, _COPY_BLOCK):
                ds[start:start + _COPY_BLOCK] = to_current(old[start:start + _COPY_BLOCK])
        os.replace(tmp, self.path)
        if why == "recovered":
            log.warning("results file %s was not closed cleanly; its %d rows were recovered", self.path, n)
        else:
            log.warning("results file %s: %d rows copied into schema %d (%s)", self.path, n, SCHEMA_VERSION, why)

    def _load_index(self) -> None:
        """Rebuild the replay index from the last ``replay_window`` rows: ok replies that were computed
        (not replayed), with a request digest (a client-chosen id) and a recorded reply."""
        n = self._ds.shape[0]
        if not self.replay_window or not n:
            return
        start = max(0, n - self.replay_window)
        cols = self._ds.fields(["request_id", "ok", "index", "replayed", "request_digest"])[start:n]
        usable = (cols["ok"] == 1) & (cols["replayed"] == 0) & (cols["request_digest"] != b"")
        heads = np.flatnonzero(usable & (cols["index"] == 0))
        for k, i in enumerate(heads):
            rid = cols["request_id"][i]
            end = heads[k + 1] if k + 1 < len(heads) else len(cols)
            j = i + 1
            while j < end and cols["index"][j] == j - i and cols["request_id"][j] == rid:
                j += 1
            self._remember(rid.decode("utf-8", "replace"), start + int(i), int(j - i), cols["request_digest"][i].decode())

    def _remember(self, rid: str, row: int, n_rows: int, digest: str) -> None:
        self._index[rid] = (row, n_rows, digest)
        self._index.move_to_end(rid)
        while len(self._index) > self.replay_window:
            self._index.popitem(last=False)

    # -- writing ----------------------------------------------------------------------------------
    def rows(self, reply: dict, *, source: str = "", model: dict | None = None, provider: str | None = None,
             digest: str | None = None, replayed: bool = False) -> np.ndarray:
        """The rows a reply becomes (several for a batch). ``model``/``provider`` fill in error rows."""
        out = reply_rows(reply, server=self.server, source=source, model=model, provider=provider,
                         digest=digest, replayed=replayed)
        if not replayed:
            text = reply_json(reply)
            if not put_reply_json(out, text):
                log.warning("results log %s: reply %s is %d bytes, more than its %d row(s) hold; it is logged "
                            "without its JSON (a retry of this id is computed again)",
                            self.path, reply.get("request_id"), len(text), len(out))
        return out

    def append(self, reply: dict, *, source: str = "", model: dict | None = None, provider: str | None = None,
               digest: str | None = None, replayed: bool = False) -> bool:
        """Write and flush the row(s) of one reply. Never raises: a full disk must not stop the server;
        failures are counted in ``failures`` / ``last_error`` (Tango ALARM, ZeroMQ health) and logged.

        ``digest``: ``request_digest`` of a request whose client chose its ``request_id``; an ok reply
        given with one can be replayed. ``replayed``: this reply was given again (``replay``), not computed."""
        try:
            rows = self.rows(reply, source=source, model=model, provider=provider, digest=digest, replayed=replayed)
            with self._lock:
                if self._file is None:
                    raise ResultsLogError("results log is closed")
                n = self._ds.shape[0]
                self._ds.resize((n + len(rows),))
                self._ds[n:] = rows
                self._file.flush()  # before the caller sends the reply: a received reply is a logged reply
                self.rows_written += len(rows)
                if digest and reply.get("ok") and not replayed and self.replay_window and rows[0]["reply_json"]:
                    self._remember(str(reply.get("request_id")), n, len(rows), digest)
            return True
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("results log %s: cannot append reply %s: %s", self.path, reply.get("request_id"), exc)
            return False

    def replay(self, request_id: str, digest) -> dict | None:
        """The recorded ok reply to ``request_id`` when the new request has the same digest, else None.

        ``digest``: the new request's ``request_digest``, or a callable giving it (called only when the id
        is known, so a request that is not a retry costs one dictionary look-up). Never raises."""
        entry = self._index.get(request_id)
        if entry is None:
            return None
        row, n_rows, recorded = entry
        try:
            wanted = digest() if callable(digest) else digest
            if wanted != recorded:
                log.warning("request id %r was answered before for other data or by another model; "
                            "this one is classified anew", request_id)
                return None
            with self._lock:
                if self._file is None:
                    return None
                pieces = self._ds.fields("reply_json")[row:row + n_rows]
            reply = json.loads(b"".join(bytes(p) for p in pieces).decode("utf-8"))
            return reply if reply.get("request_id") == request_id and reply.get("ok") else None
        except Exception as exc:  # a damaged row: classify again rather than fail the request
            log.error("results log %s: cannot replay %r: %s", self.path, request_id, exc)
            return None

    @property
    def replayable(self) -> int:
        """How many request ids ``replay`` can answer now."""
        return len(self._index)

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
    """The log as a list of dicts (strings decoded, probabilities cut to ``n_classes``).

    Reads schema 1 and 2 files alike (schema 1 rows get ``replayed`` False and empty ``request_digest``).
    ``reply`` is the whole JSON reply as sent, on the first row of each reply (``index`` 0; a batch's pieces
    are joined), or None (rows of a replayed reply, other rows of a batch, schema-1 rows, errors of
    an old file); ``reply_json`` is this row's raw piece of it."""
    rows, _ = _read_rows(Path(path))
    return row_dicts(to_current(rows))
