"""The EPICS bridge's result PVs (``server.epics``): a p4p server of NTScalar PVs under one prefix.

Per scan the answer's PVs are posted first and the counters last, under one lock, so a client that sees
``scans`` change reads a complete result; ``status`` carries a MAJOR alarm while the last scan failed.
"""

from __future__ import annotations

import json
import threading

from p4p.nt import NTScalar
from p4p.server import Server
from p4p.server.thread import SharedPV

from defectscope.errors import DefectscopeError

_RESULT_PVS = {  # name -> (NTScalar type code, initial value)
    "label": ("s", ""), "probabilities": ("ad", []), "classes": ("as", []), "decision": ("s", ""),
    "model": ("s", ""), "model_version": ("s", ""), "provider": ("s", ""), "last_latency_ms": ("d", 0.0),
    "warnings": ("as", []), "request_id": ("s", ""), "reply": ("s", ""), "error": ("s", ""),
    "status": ("s", "connecting"), "scans": ("l", 0), "scans_failed": ("l", 0),
}


class ResultPVs:
    """The bridge's PVA server: one NTScalar SharedPV per result, posted from any thread."""

    def __init__(self, prefix: str, conf: dict | None = None, useenv: bool = True):
        self.prefix = prefix
        self.pvs = {name: SharedPV(nt=NTScalar(code), initial=initial) for name, (code, initial) in _RESULT_PVS.items()}
        self.server = Server(providers=[{prefix + name: pv for name, pv in self.pvs.items()}], conf=conf,
                             useenv=useenv)
        self.scans = self.failed = 0
        self._lock = threading.Lock()  # one scan's result PVs posted at a time, the counters last

    def conf(self) -> dict:
        return self.server.conf()

    def close(self) -> None:
        self.server.stop()

    def status(self, text: str, severity: int = 0) -> None:
        self.pvs["status"].post(text, severity=severity, message=text if severity else "")

    def result(self, reply: dict) -> None:
        with self._lock:
            self._post_result(reply)

    def _post_result(self, reply: dict) -> None:
        model = reply.get("model") or {}
        values = {"label": reply["label"], "probabilities": [float(p) for p in reply["probabilities"]],
                  "classes": list(reply["classes"]), "decision": reply.get("decision", ""),
                  "model": model.get("name", ""), "model_version": f"{model.get('name', '')} {model.get('version', '')}",
                  "provider": reply.get("provider", ""), "last_latency_ms": float(reply["timings_ms"]["total"]),
                  "warnings": [f"{w['reason']}: {w['message']}" for w in reply.get("warnings", [])],
                  "request_id": reply.get("request_id") or "", "reply": json.dumps(reply), "error": ""}
        for name, value in values.items():
            self.pvs[name].post(value)
        self.scans += 1
        self.status("classified")
        self.pvs["scans"].post(self.scans)

    def error(self, text: str) -> None:
        with self._lock:
            self.pvs["error"].post(text)
            self.scans += 1
            self.failed += 1
            self.status("failed", severity=2)
            self.pvs["scans_failed"].post(self.failed)
            self.pvs["scans"].post(self.scans)


def describe_error(exc: BaseException) -> str:
    """``REASON: message``: the protocol reason of a defectscope error, else the exception's type."""
    if isinstance(exc, DefectscopeError):
        return f"{exc.reason}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"
