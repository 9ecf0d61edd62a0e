"""Exceptions raised by hopps.

Every failure of a call to a node raises a subclass of :class:`HoppsError` named after its gRPC
status code, whose message is the server's message (it names the model, table, version or key and
says what to fix). Where a built-in exception means the same, the class also derives from it, so
``except ValueError`` catches :class:`InvalidArgument` and ``except LookupError`` catches
:class:`NotFound`. Arguments that are wrong before any call is made (a float key, a values array
of the wrong shape) raise :class:`InvalidArgument` too.
"""

from __future__ import annotations

__all__ = [
    "HoppsError",
    "Cancelled",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
]


class HoppsError(Exception):
    """Base class of every hopps error. ``code`` is the gRPC status code name."""

    code: str = "UNKNOWN"

    @property
    def message(self) -> str:
        """The server's (or the client's) message."""
        return str(self.args[0]) if self.args else ""

    @property
    def retryable(self) -> bool:
        """Whether the same call, retried (possibly on another node), can succeed."""
        return self.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")


class Cancelled(HoppsError):
    code = "CANCELLED"


class InvalidArgument(HoppsError, ValueError):
    """A bad request: wrong dtype or shape, keys not a whole number of u64, too many keys, ..."""

    code = "INVALID_ARGUMENT"


class DeadlineExceeded(HoppsError, TimeoutError):
    code = "DEADLINE_EXCEEDED"


class NotFound(HoppsError, LookupError):
    """An unknown model, table or version (or a key of a table whose missing policy is error)."""

    code = "NOT_FOUND"


class AlreadyExists(HoppsError):
    """Someone got there first: a version number taken, a model created with another spec."""

    code = "ALREADY_EXISTS"


class PermissionDenied(HoppsError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(HoppsError):
    """A limit was hit: keys per request, message size, the node's memory."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(HoppsError):
    """The call cannot run in the current state (a pinned version no longer readable, ...)."""

    code = "FAILED_PRECONDITION"


class Aborted(HoppsError):
    code = "ABORTED"


class OutOfRange(HoppsError):
    code = "OUT_OF_RANGE"


class Unimplemented(HoppsError):
    code = "UNIMPLEMENTED"


class Internal(HoppsError):
    code = "INTERNAL"


class Unavailable(HoppsError, ConnectionError):
    """The node (or the repository's storage) cannot be reached."""

    code = "UNAVAILABLE"


class DataLoss(HoppsError):
    """Stored bytes are damaged: checksum or size mismatch, truncated file."""

    code = "DATA_LOSS"


class Unauthenticated(HoppsError):
    code = "UNAUTHENTICATED"


# Shown as hopps.NotFound (not hopps._errors.NotFound) in tracebacks and reprs.
for _name in __all__:
    globals()[_name].__module__ = "hopps"
del _name
