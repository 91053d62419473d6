"""Domain errors, and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


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


class DefinitionError(InvalidArgument):
    """A saga definition is invalid.

    The message names the source (file), the step and the field at fault.
    """

    def __init__(self, problem: str, *, source: str = "", step: str = "", field: str = "") -> None:
        where = ", ".join(
            part for part in (source, f"step {step!r}" if step else "", f"field {field!r}" if field else "") if part
        )
        super().__init__(f"{where}: {problem}" if where else problem)
        self.problem = problem
        self.source = source
        self.step = step
        self.field = field


def grpc_status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a handler answers for `error`."""
    if isinstance(error, CompensaError):
        return error.code, str(error)
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
