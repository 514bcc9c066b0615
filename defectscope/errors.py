"""One exception root for the whole product.

Each class carries one of the fixed error reasons of the ``defectscope/1`` protocol (SPEC §4), so a bad
input becomes the same reason on ZeroMQ, on Tango (``DevFailed`` reason) and in the CLI. Every class also
inherits the built-in exception it refines, so ``except ValueError`` keeps working for library users.
"""

from __future__ import annotations

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
    reason = "INTERNAL"


BY_REASON = {cls.reason: cls for cls in DefectscopeError.__subclasses__()}
assert set(BY_REASON) == set(REASONS), "every protocol reason has exactly one exception class"


def from_reason(reason: str, message: str) -> DefectscopeError:
    """Rebuild the exception for a reason received over the wire (client side)."""
    return BY_REASON.get(reason, Internal)(message)
