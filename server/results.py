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
import xxhash

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)        # schema 1: the same columns without reply_json, request_digest, replayed
DATASET = "results"
MAX_CLASSES = 8
TIMINGS = ("decode", "orthonormalise", "prepare", "infer", "total")
REPLY_PIECE_BYTES = 4096         # reply_json bytes per row (a one-map reply is ~1.4 kB; a batch has a row per map)
DEFAULT_REPLAY_WINDOW = 100_000  # request ids whose reply can be given again (memory: ~350 bytes each)
_CHUNK_ROWS = 16
_COPY_BLOCK = 4096               # rows per block when a file is rewritten (recovery, schema migration)

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


class ResultsLogError(RuntimeError):
    """The results file cannot be used (not ours, wrong schema, locked by another writer, unwritable)."""


def _fit(text, width: int) -> bytes:
    """UTF-8 bytes of ``text`` cut to ``width`` without splitting a character."""
    raw = str(text if text is not None else "").encode("utf-8", "replace")
    if len(raw) <= width:
        return raw
    return raw[:width].decode("utf-8", "ignore").encode("utf-8")


def replayable(request) -> bool:
    """Whether a ``protocol.Request`` may be answered from an earlier reply: its client chose its
    ``request_id`` (a server-made id is never reused), and all of its data came with it (a streamed scan,
    whose frames follow in later messages, is not fingerprinted when it opens, so it is never replayed)."""
    header = getattr(request, "header", None) or {}
    return header.get("request_id") is not None and not (getattr(request, "spec", None) or {}).get("stream")


def request_digest(request, model: dict | None) -> str:
    """Fingerprint of a ``protocol.Request`` answered by ``model`` (``Predictor.describe()``: name, version,
    sha256): its ``input`` object (keys with a null value dropped: absent and null mean the same), the
    model, and the bytes of its arrays (maps, frames, mask; for a ``file`` request, the data read from the
    file, ``Classifier.load_file``). Equal digests: the same answer. ``options`` are left out: they change
    what comes with a reply (the prepared map), not the classification.

    XXH3-128, not SHA-256: on a 53 MB raw scan it takes ~3 ms against ~30 ms (``benchmarks/bench_digest.py``).
    It tells retries from new data; it is not a security boundary (a replay is looked up by the client's
    own request id, so a crafted collision can only bring a client an earlier answer to its own id)."""
    if request.kind == "file" and request.array is None:
        raise ValueError("a file request is fingerprinted by its data: read it first (Classifier.load_file)")
    h = xxhash.xxh3_128()
    spec = {k: v for k, v in (request.spec or {}).items() if v is not None}
    who = {k: (model or {}).get(k) for k in ("name", "version", "sha256")}
    h.update(json.dumps({"kind": request.kind, "input": spec, "model": who}, sort_keys=True,
                        default=str).encode("utf-8"))
    arrays = [request.array] if request.array is not None else list(request.frames or [])
    if request.mask is not None:
        arrays.append(request.mask)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"|{a.dtype.str}{list(a.shape)}|".encode("ascii"))
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


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
                ds[start:start + _COPY_BLOCK] = _to_current(old[start:start + _COPY_BLOCK])
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
            row["request_digest"] = _fit(digest or "", 32)
            row["replayed"] = 1 if replayed else 0
        if not replayed:
            text = json.dumps(reply, allow_nan=False, separators=(",", ":")).encode("utf-8")  # ASCII: no NUL
            if len(text) <= len(out) * REPLY_PIECE_BYTES:
                for i in range(len(out)):
                    out[i]["reply_json"] = text[i * REPLY_PIECE_BYTES:(i + 1) * REPLY_PIECE_BYTES]
            else:
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


def _to_current(rows: np.ndarray) -> np.ndarray:
    """Rows of any readable schema in the current ``RESULT_DTYPE`` (columns a schema lacks are empty)."""
    if rows.dtype == RESULT_DTYPE:
        return rows
    out = np.zeros(rows.shape, dtype=RESULT_DTYPE)
    for name in rows.dtype.names:
        if name in RESULT_DTYPE.names:
            out[name] = rows[name]
    return out


def read_results(path: str | Path) -> list[dict]:
    """The log as a list of dicts (strings decoded, probabilities cut to ``n_classes``).

    Reads schema 1 and 2 files alike (schema 1 rows get ``replayed`` False and empty ``request_digest``).
    ``reply`` is the whole JSON reply as sent, on the first row of each reply (``index`` 0; a batch's pieces
    are joined), or None (rows of a replayed reply, other rows of a batch, schema-1 rows, errors of
    an old file); ``reply_json`` is this row's raw piece of it."""
    rows, _ = _read_rows(Path(path))
    rows = _to_current(rows)
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
        d["reply"] = None
        if d["index"] == 0 and row["reply_json"]:
            text, j = bytes(row["reply_json"]), k + 1
            while j < len(rows) and rows[j]["index"] == j - k and rows[j]["request_id"] == row["request_id"]:
                text += bytes(rows[j]["reply_json"])
                j += 1
            try:
                d["reply"] = json.loads(text.decode("utf-8"))
            except ValueError:  # cut short: an oversized reply of an older writer
                d["reply"] = None
        out.append(d)
    return out
