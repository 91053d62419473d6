"""The dashboard's sign-in sessions: the cookie holds a random session id,
never the bearer token, and signing out ends the session on the server, so a
copy of the cookie is worth nothing afterwards.

Sessions live in the memory of the process that signed the browser in: a
restart signs everyone out, and behind a load balancer a browser must keep to
one replica (or send its token in an Authorization header). The token itself
is checked again at every request, so a token taken out of the token file, or
a JWT that expires, ends its sessions too.
"""

from __future__ import annotations

import hashlib
import secrets
import time

__all__ = ["SESSION_COOKIE", "SESSION_SECONDS", "Sessions"]

#: The cookie that carries the session id.
SESSION_COOKIE = "compensa_session"
#: A session ends this long after sign-in, whatever happens meanwhile.
SESSION_SECONDS = 8 * 3600.0
#: The most sessions kept at once; past it the oldest is ended first.
MAX_SESSIONS = 10_000


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    """Open sign-in sessions, each the bearer token it was opened with."""

    def __init__(self, lifetime: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self._lifetime = lifetime
        self._limit = limit
        # By the SHA-256 of the session id, oldest first: (token, expiry).
        self._open: dict[str, tuple[str, float]] = {}

    def open(self, token: str) -> str:
        """A new session for `token`; its id, for the cookie."""
        while len(self._open) >= self._limit:
            del self._open[next(iter(self._open))]
        session_id = secrets.token_urlsafe(32)
        self._open[_key(session_id)] = (token, time.monotonic() + self._lifetime)
        return session_id

    def token(self, session_id: str | None) -> str | None:
        """The token of a session still open; None for an unknown, ended or expired one."""
        if not session_id:
            return None
        key = _key(session_id)
        found = self._open.get(key)
        if found is None:
            return None
        token, expiry = found
        if time.monotonic() >= expiry:
            del self._open[key]
            return None
        return token

    def close(self, session_id: str | None) -> None:
        """Ends the session (signing out); nothing if there is none."""
        if session_id:
            self._open.pop(_key(session_id), None)
