"""What the results log records about a request: whether it may be replayed, its digest, and its source.

A reply is given again (SPEC §4 retries, ``ResultsLog.replay``) only to a request that chose its own
``request_id`` and whose ``request_digest`` equals the one recorded with the earlier reply: the same input,
the same data bytes and the same model. ``describe_source`` names what was classified, for the ``source``
column.
"""

from __future__ import annotations

import json

import numpy as np
import xxhash


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
