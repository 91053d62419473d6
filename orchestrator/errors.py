"""Domain errors, and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


#: How much of an input value an error message quotes.
QUOTED_PREFIX_CHARS = 40


def quote(value: str | bytes, limit: int = QUOTED_PREFIX_CHARS) -> str:
    """`value` for an error message: its repr, cut to a short prefix (with its
    length) when longer, so no error echoes a whole input."""
    if len(value) <= limit:
        return repr(value)
    unit = "bytes" if isinstance(value, bytes) else "characters"
    return f"{value[:limit]!r}... ({len(value)} {unit})"


class CompensaError(Exception):
    """Root of every error Compensa raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(CompensaError):
    """The request is malformed; the message names the field and what to fix."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CompensaError):
    """The named saga, definition or step does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CompensaError):
    """A resource with this id exists with different content."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CompensaError):
    """The saga is not in a state that allows the action."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(CompensaError):
    """The caller's identity does not allow the action."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CompensaError):
    """The call carries no identity the deployment accepts (no client
    certificate, no bearer token, or one it does not know)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(CompensaError):
    """A per-client limit is reached; the message names the limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StoreUnavailable(CompensaError):
    """The database cannot be reached; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class SchemaMismatch(CompensaError):
    """The database's schema is not at the revision this release runs on;
    the message names the command that fixes it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RejectedWrite(InvalidArgument):
    """The database refused the values of one write (a value out of a column's
    range, say): nothing of it was stored. Requests are validated before they
    write, so this names a gap in that validation; other writes flushed with
    it are retried without it and land."""


class DefinitionError(InvalidArgument):
    """A saga definition is invalid.

    The message names the source (file), the step and the field at fault.
    """

    def __init__(self, problem: str, *, source: str = "", step: str = "", field: str = "") -> None:
        where = ", ".join(
            part for part in (source, f"step {quote(step)}" if step else "", f"field {quote(field)}" if field else "") if part
        )
        super().__init__(f"{where}: {problem}" if where else problem)
        self.problem = problem
        self.source = source
        self.step = step
        self.field = field


#: The longest status message a handler answers: a client with gRPC's default
#: 16 KB metadata limit must be able to read every one.
MAX_STATUS_MESSAGE_CHARS = 1000


def grpc_status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a handler answers for `error`; the message
    is cut to MAX_STATUS_MESSAGE_CHARS."""
    if isinstance(error, CompensaError):
        message = str(error)
        if len(message) > MAX_STATUS_MESSAGE_CHARS:
            message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
        return error.code, message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def http_status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and message the dashboard answers for `error`, the
    counterpart of `grpc_status_of`."""
    code, message = grpc_status_of(error)
    return _HTTP_STATUS.get(code, 500), message
