"""What the orchestrator accepts: the documented limits, and the checks every
request value passes before it can reach the database.

A value the database would refuse (a NUL character, a string longer than its
column, a number out of its type's range) must never get as far as a group
commit, where it would fail the writes of other sagas flushed with it. Every
limit here is documented in the README and in the proto comments of the
fields concerned.
"""

from __future__ import annotations

import re

from google.protobuf import duration_pb2

from compensa.orchestrator.shared.errors import InvalidArgument, quote

#: Saga ids: 1-128 characters of letters, digits, '.', '_', ':' and '-'.
SAGA_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: The longest saga id (the column's size).
MAX_SAGA_ID_CHARS = 128
#: Bulk action ids (a StartBulkAction request_id): 1-64 letters, digits, '.', '_' and '-'.
BULK_ACTION_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The longest `actor` a request may claim; the log's column also holds the
#: client certificate's name next to it.
MAX_ACTOR_CHARS = 128
#: The longest actor the log stores (the column's size).
MAX_STORED_ACTOR_CHARS = 256
#: The longest free text a request may carry: a cancel or retry `reason`, a
#: resolution `note`, a step's `failure_reason`, a definition's `description`.
MAX_TEXT_CHARS = 4096
#: The longest text the server itself composes into the log (a participant's
#: error details, say) before it is cut.
MAX_STORED_TEXT_CHARS = 4096
#: The largest int32 and int64, the ranges of the API's integer fields.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
#: The longest page token the server issues (far shorter in practice).
MAX_PAGE_TOKEN_CHARS = 1024
#: The longest WatchSagas resume token accepted (about 150 databases).
MAX_RESUME_TOKEN_CHARS = 4096
#: The longest `stuck_for` (ListSagas, SummarizeSagas): ten years.
MAX_STUCK_FOR_SECONDS = 3650 * 86400

#: A participant's limits (ParticipantLimits): calls in flight, calls per
#: second, and the burst. Larger ones are no limit, and are refused as a
#: likely mistake.
MAX_PARTICIPANT_IN_FLIGHT = 10_000
MAX_PARTICIPANT_CALLS_PER_SECOND = 100_000.0
MAX_PARTICIPANT_BURST = 100_000

# google.protobuf.Duration's own range: about +-10,000 years.
_DURATION_MAX_SECONDS = 315_576_000_000
_NANOS_PER_SECOND = 1_000_000_000


def check_text(value: str, field: str, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """`value` if the database can store it as text of at most `max_chars`
    characters; InvalidArgument naming `field` otherwise (a NUL character,
    text that is not valid Unicode, or too long)."""
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is {len(value)} characters long; the limit is {max_chars}")
    if "\x00" in value:
        raise InvalidArgument(f"{field} contains a NUL character (\\x00), which cannot be stored: remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{field} is not valid Unicode text (it has a lone surrogate): fix its encoding"
        ) from None
    return value


def stored_text(value: str, max_chars: int = MAX_STORED_TEXT_CHARS) -> str:
    """Text the server composed from what others sent (a participant's error
    details), made storable: NUL and lone surrogates replaced, cut to
    `max_chars`. Never rejects: the saga must be able to record it."""
    cleaned = value.replace("\x00", "\ufffd")
    if len(cleaned) > max_chars:
        cleaned = cleaned[: max_chars - 3] + "..."
    return cleaned.encode("utf-8", "replace").decode("utf-8")


def is_possible(value: str, field: str, pattern: re.Pattern[str]) -> bool:
    """Whether `value` could name something (a full match of `pattern`): a
    lookup of a name that cannot exist answers NOT_FOUND without asking the
    database. A value that is empty or not even storable text is
    InvalidArgument naming `field`."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    check_text(value, field, max_chars=len(value))
    return pattern.fullmatch(value) is not None


def check_filter(value: str, field: str, pattern: re.Pattern[str], what: str) -> str:
    """A filter on names: empty (any) or a possible name (`what` says of what)."""
    if value and not is_possible(value, field, pattern):
        raise InvalidArgument(f"{field} must be empty (any) or a {what} name, got {quote(value)}")
    return value


def check_position(text: str, field: str) -> int:
    """A log position or sequence given as text: decimal digits, at most INT64_MAX."""
    if not (text.isascii() and text.isdigit()) or int(text) > INT64_MAX:
        raise InvalidArgument(f"{field} must be a log position (0 to {INT64_MAX}), got {quote(text)}")
    return int(text)


def check_saga_id(saga_id: str, field: str = "saga_id") -> str:
    """`saga_id` if it is a valid saga id (a full match of SAGA_ID_PATTERN)."""
    if not saga_id:
        raise InvalidArgument(f"{field} is required")
    if not SAGA_ID_PATTERN.fullmatch(saga_id):
        raise InvalidArgument(
            f"{field} must be 1-{MAX_SAGA_ID_CHARS} characters of letters, digits, '.', '_', ':' or '-',"
            f" got {quote(saga_id)}"
        )
    return saga_id


def check_int(value: int, field: str, *, minimum: int, maximum: int) -> int:
    """`value` if minimum <= value <= maximum; InvalidArgument naming `field` otherwise."""
    if not minimum <= value <= maximum:
        raise InvalidArgument(f"{field} must be from {minimum} to {maximum}, got {value}")
    return value


def duration_problem(
    duration: duration_pb2.Duration, *, minimum: float, maximum: float, exclusive_minimum: bool = False
) -> str | None:
    """What is wrong with `duration` ("must be ..."), or None if it is a
    well-formed Duration within [minimum, maximum] (or (minimum, maximum]).
    The raw fields are checked first, so an ill-formed Duration (nanos out of
    range, or of the other sign than seconds) is told as such."""
    seconds, nanos = duration.seconds, duration.nanos
    if (
        abs(seconds) > _DURATION_MAX_SECONDS
        or abs(nanos) >= _NANOS_PER_SECOND
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        return (
            f"must be a valid Duration: nanos within +-999,999,999 and of the sign of seconds,"
            f" got seconds {seconds}, nanos {nanos}"
        )
    value = seconds + nanos / _NANOS_PER_SECOND
    shown = duration.ToJsonString()
    if exclusive_minimum and value <= minimum:
        return f"must be positive, got {shown}" if minimum == 0 else f"must be above {minimum:g}s, got {shown}"
    if not exclusive_minimum and not minimum <= value <= maximum:
        return f"must be from {minimum:g} to {maximum:g}s, got {shown}"
    if value > maximum:
        return f"must be at most {maximum:g}s, got {shown}"
    return None


def check_duration(
    duration: duration_pb2.Duration, field: str, *, minimum: float, maximum: float, exclusive_minimum: bool = False
) -> float:
    """The length of `duration` in seconds if `duration_problem` finds nothing
    wrong with it; InvalidArgument naming `field` otherwise."""
    problem = duration_problem(duration, minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum)
    if problem is not None:
        raise InvalidArgument(f"{field} {problem}")
    return duration.seconds + duration.nanos / _NANOS_PER_SECOND
