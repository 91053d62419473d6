"""Resume tokens of WatchSagas and WatchAlerts: where a stream stands in
each database's log (of events, or of alerts).

A token is a position per database, keyed by the id the database gives
itself (docs/partitions.md), so it stays valid while databases are added
and whatever order replicas name them in. It is opaque to clients but not
secret: it only chooses where reading starts, as `after_position` does.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping

from compensa.orchestrator.shared.errors import InvalidArgument
from compensa.orchestrator.shared.limits import INT64_MAX, MAX_RESUME_TOKEN_CHARS

#: The logs a token is a position in, by the prefix that says which (and
#: which version of the format): a token of one is refused by the other.
EVENT_LOG = "w1"
ALERT_LOG = "a1"
_MALFORMED = (
    "resume_token is not one this server issued for this stream: pass back, unchanged, the resume_token of a"
    " response of the same RPC"
)


def issue_resume_token(log: str, positions: Mapping[str, int]) -> str:
    """The token of these positions in `log` (database id -> last position sent)."""
    payload = json.dumps(sorted(positions.items()), separators=(",", ":")).encode()
    return f"{log}.{base64.urlsafe_b64encode(payload).decode().rstrip('=')}"


def read_resume_token(log: str, token: str) -> dict[str, int]:
    """The positions in a token `issue_resume_token` made for `log`;
    InvalidArgument for any other string."""
    version, dot, payload = token.partition(".")
    if len(token) > MAX_RESUME_TOKEN_CHARS or version != log or not dot:
        raise InvalidArgument(_MALFORMED)
    try:
        pairs = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        raise InvalidArgument(_MALFORMED) from None
    if not isinstance(pairs, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
        and type(pair[1]) is int and 0 <= pair[1] <= INT64_MAX
        for pair in pairs
    ):
        raise InvalidArgument(_MALFORMED)
    return {database: position for database, position in pairs}
