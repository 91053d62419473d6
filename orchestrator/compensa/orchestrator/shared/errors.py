"""Domain errors, and the one place that maps them to gRPC status codes.

Every status also carries a google.rpc.ErrorInfo (AIP-193) with a stable
`reason` per error class, in the domain ERROR_DOMAIN: clients branch on the
reason, never on the message text. An error that may be retried after a
known wait also carries a google.rpc.RetryInfo with that wait.
"""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status

from compensa.common.database import database_error_text
from compensa.common.health import UNREACHABLE_REASON

#: The ErrorInfo domain of every error the orchestrator answers.
ERROR_DOMAIN = "compensa.v1.OrchestratorService"
#: The ErrorInfo reason of an error Compensa did not raise on purpose.
INTERNAL_REASON = "INTERNAL_ERROR"


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
    #: The stable ErrorInfo reason of this class of error.
    reason: str = INTERNAL_REASON

    def error_metadata(self) -> dict[str, str]:
        """ErrorInfo metadata: what a client may read besides the reason."""
        return {}

    def retry_delay(self) -> float | None:
        """Seconds after which the same call may be made again (RetryInfo);
        None when the error says nothing about retrying."""
        return None


class InvalidArgument(CompensaError):
    """The request is malformed; the message names the field and what to fix."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class NotFound(CompensaError):
    """The named saga, definition or step does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


def saga_not_found(saga_id: str) -> NotFound:
    """The one answer for a saga that does not exist (or that the caller may
    not see: the two are worded alike)."""
    return NotFound(f"saga {quote(saga_id)} not found")


def definition_not_registered(name: str) -> NotFound:
    """The answer for a definition name nothing is registered under."""
    return NotFound(f"definition {quote(name)} not found; register it first")


class AlreadyExists(CompensaError):
    """A resource with this id exists with different content."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "SAGA_ID_TAKEN"


class FailedPrecondition(CompensaError):
    """The saga is not in a state that allows the action."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "SAGA_STATE_FORBIDS"


class PermissionDenied(CompensaError):
    """The caller's identity does not allow the action."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "NOT_AN_OPERATOR"


class Unauthenticated(CompensaError):
    """The call carries no identity the deployment accepts (no client
    certificate, no bearer token, or one it does not know)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(CompensaError):
    """A per-client limit is reached; the message names the limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AtCapacity(ResourceExhausted):
    """This replica works on as many sagas as it may take on at once: nothing
    was done; the same call may be made again after `seconds` (here, or on
    another replica)."""

    reason = "REPLICA_AT_CAPACITY"

    def __init__(self, message: str, *, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds

    def retry_delay(self) -> float | None:
        return self.seconds


class StoreUnavailable(CompensaError):
    """The database cannot be reached; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE
    # The reason database health gives an outage in which it was not reached.
    reason = UNREACHABLE_REASON

    @classmethod
    def of(cls, error: BaseException) -> StoreUnavailable:
        """`error` of the database driver in one line (SQLAlchemy adds the statement and its parameters)."""
        return cls(f"database unavailable: {database_error_text(error)}")


class DatabaseRefusesWrites(StoreUnavailable):
    """The database answers but refuses to store anything, for a reason that
    does not pass by itself: health stays NOT_SERVING until a write succeeds.
    The message says why without the database's internals (file paths)."""

    #: The SQLSTATE the database answered.
    sqlstate: str = ""


class DatabaseFull(DatabaseRefusesWrites):
    """The database is out of space (SQLSTATE 53100)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "DATABASE_FULL"
    sqlstate = "53100"


class DatabaseReadOnly(DatabaseRefusesWrites):
    """The database takes no writes (SQLSTATE 25006): a standby, say, after a
    failover, when the URL does not lead to the primary."""

    reason = "DATABASE_READ_ONLY"
    sqlstate = "25006"


class DatabasePermissionDenied(DatabaseRefusesWrites):
    """The database user may no longer write the orchestrator's tables
    (SQLSTATE 42501)."""

    reason = "DATABASE_PERMISSION_DENIED"
    sqlstate = "42501"


class SchemaMismatch(CompensaError):
    """The database's schema is not at the revision this release runs on;
    the message names the command that fixes it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RejectedWrite(InvalidArgument):
    """The database refused the values of one write (a value out of a column's
    range, say): nothing of it was stored. Requests are validated before they
    write, so this names a gap in that validation; other writes flushed with
    it are retried without it and land."""

    reason = "VALUE_REFUSED_BY_DATABASE"


class DefinitionError(InvalidArgument):
    """A saga definition is invalid.

    The message names the source (file), the step and the field at fault.
    """

    reason = "INVALID_DEFINITION"

    def __init__(self, problem: str, *, source: str = "", step: str = "", field: str = "") -> None:
        where = ", ".join(
            part
            for part in (source, f"step {quote(step)}" if step else "", f"field {quote(field)}" if field else "")
            if part
        )
        super().__init__(f"{where}: {problem}" if where else problem)
        self.problem = problem
        self.source = source
        self.step = step
        self.field = field

    def error_metadata(self) -> dict[str, str]:
        where = {"source": self.source, "step": self.step, "field": self.field}
        return {key: value[:QUOTED_PREFIX_CHARS * 4] for key, value in where.items() if value}


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


def grpc_error_details(error: BaseException) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries `error`'s google.rpc.Status, with
    its ErrorInfo (and RetryInfo, when it has a retry delay), to the client
    (grpc-status-details-bin)."""
    code, message = grpc_status_of(error)
    info = ErrorInfo(domain=ERROR_DOMAIN)
    retry_delay = None
    if isinstance(error, CompensaError):
        info.reason = error.reason
        info.metadata.update(error.error_metadata())
        retry_delay = error.retry_delay()
    else:
        info.reason = INTERNAL_REASON
    status = Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    if retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(retry_delay * 1e9))
        status.details.add().Pack(RetryInfo(retry_delay=delay))
    return (("grpc-status-details-bin", status.SerializeToString()),)
