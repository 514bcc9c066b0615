"""One exception root for the whole product.

Each class carries one of the fixed error reasons of the ``defectscope/1`` protocol (SPEC §4), so a bad
input becomes the same reason on ZeroMQ, on Tango (``DevFailed`` reason) and in the CLI. Every class also
inherits the built-in exception it refines, so ``except ValueError`` keeps working for library users.
"""

from __future__ import annotations

import logging
import uuid

REASONS = (
    "BAD_MESSAGE",
    "UNSUPPORTED_PROTOCOL",
    "UNKNOWN_OP",
    "DTYPE_NOT_ALLOWED",
    "SHAPE_MISMATCH",
    "TOO_LARGE",
    "NON_FINITE",
    "LOW_SIGNAL",
    "BAD_GEOMETRY",
    "PATH_NOT_ALLOWED",
    "BUSY",
    "MODEL_UNAVAILABLE",
    "UNAUTHORIZED",
    "INTERNAL",
)


class DefectscopeError(Exception):
    """Root of every error defectscope raises on purpose; ``reason`` is a protocol reason."""

    reason = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"reason": self.reason, "message": self.message}


class BadMessage(DefectscopeError, ValueError):
    reason = "BAD_MESSAGE"


class UnsupportedProtocol(DefectscopeError, ValueError):
    reason = "UNSUPPORTED_PROTOCOL"


class UnknownOp(DefectscopeError, ValueError):
    reason = "UNKNOWN_OP"


class DtypeNotAllowed(DefectscopeError, TypeError):
    reason = "DTYPE_NOT_ALLOWED"


class ShapeMismatch(DefectscopeError, ValueError):
    reason = "SHAPE_MISMATCH"


class TooLarge(DefectscopeError, ValueError):
    reason = "TOO_LARGE"


class NonFinite(DefectscopeError, ValueError):
    reason = "NON_FINITE"


class LowSignal(DefectscopeError, ValueError):
    reason = "LOW_SIGNAL"


class BadGeometry(DefectscopeError, ValueError):
    reason = "BAD_GEOMETRY"


class PathNotAllowed(DefectscopeError, PermissionError):
    reason = "PATH_NOT_ALLOWED"


class Busy(DefectscopeError, RuntimeError):
    reason = "BUSY"


class ModelUnavailable(DefectscopeError, RuntimeError):
    reason = "MODEL_UNAVAILABLE"


class Unauthorized(DefectscopeError, PermissionError):
    reason = "UNAUTHORIZED"


class Internal(DefectscopeError, RuntimeError):
    """Something went wrong on the server's side. Made from an unexpected exception by ``incident``, it
    carries an ``incident`` id that names the log entry holding the detail."""

    reason = "INTERNAL"

    def __init__(self, message: str, incident: str | None = None):
        super().__init__(message)
        self.incident = incident

    def to_dict(self) -> dict:
        return {**super().to_dict(), **({"incident": self.incident} if self.incident else {})}


def incident(exc: BaseException, doing: str, logger: logging.Logger | None = None) -> Internal:
    """The ``INTERNAL`` error a client is told of an unexpected exception: the detail (type, message,
    traceback) goes to the server log under a new incident id; the client gets the reason, a plain message
    and that id, never the exception's text (paths, library internals)."""
    incident_id = uuid.uuid4().hex[:12]
    (logger or logging.getLogger("defectscope")).error(
        "incident %s: %s failed: %s: %s", incident_id, doing, type(exc).__name__, exc, exc_info=exc)
    return Internal(f"internal error while {doing}; the server log holds the details under incident {incident_id}",
                    incident=incident_id)


BY_REASON = {cls.reason: cls for cls in DefectscopeError.__subclasses__()}
assert set(BY_REASON) == set(REASONS), "every protocol reason has exactly one exception class"


def from_reason(reason: str, message: str) -> DefectscopeError:
    """Rebuild the exception for a reason received over the wire (client side)."""
    return BY_REASON.get(reason, Internal)(message)
