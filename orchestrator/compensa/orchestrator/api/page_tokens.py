"""Page tokens: opaque, signed, and bound to the query that issued them.

A token is the position after which the next page starts, signed with the
deployment's key together with a digest of the query's filters (AIP-158): a
token the server did not issue, or one issued for other filters, is refused
before anything in it is read, so its content is never a way in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from compensa.orchestrator.shared.errors import InvalidArgument
from compensa.orchestrator.shared.limits import MAX_PAGE_TOKEN_CHARS

_MALFORMED = (
    "page_token was not issued for this query: pass back, unchanged, the next_page_token of a response to the"
    " same request (same filters; page_size may differ)"
)


def _mac(key: bytes, query: Sequence[object], payload: str) -> str:
    digest = hashlib.sha256(json.dumps(list(query), separators=(",", ":")).encode()).hexdigest()
    signed = hmac.new(key, f"page-token:{digest}:{payload}".encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(signed).decode().rstrip("=")


def issue_page_token(key: bytes, query: Sequence[object], position: Sequence[object]) -> str:
    """A token for the page after `position`, valid only for `query` (the
    request's filters, as JSON-serializable values)."""
    payload = base64.urlsafe_b64encode(json.dumps(list(position), separators=(",", ":")).encode()).decode()
    return f"{payload}.{_mac(key, query, payload)}"


def read_page_token(key: bytes, query: Sequence[object], token: str) -> list[Any]:
    """The position in a token `issue_page_token` made for `query`;
    InvalidArgument for any other string."""
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidArgument(_MALFORMED)
    payload, dot, mac = token.rpartition(".")
    if not dot or not hmac.compare_digest(mac.encode(), _mac(key, query, payload).encode()):
        raise InvalidArgument(_MALFORMED)
    try:
        position = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):  # signed by us, so only a bug gets here
        raise InvalidArgument(_MALFORMED) from None
    if not isinstance(position, list):
        raise InvalidArgument(_MALFORMED)
    return position
