"""Completion tokens: how a long-running step reports its outcome later.

A token names the saga and the step, signed (HMAC-SHA256) with the
deployment's key, which the store keeps (`SagaStore.secret`): valid across
restarts and replicas, impossible to make up for another step.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json


def completion_token(key: bytes, saga_id: str, step: str) -> str:
    """The token a long-running step reports its outcome with: the saga and
    the step, signed with the deployment's key so that only whoever received
    the ExecuteRequest can complete that step."""
    payload = _b64(json.dumps([saga_id, step], separators=(",", ":")).encode())
    return f"{payload}.{_token_mac(key, payload)}"


def parse_completion_token(key: bytes, token: str) -> tuple[str, str]:
    """(saga id, step name) of a completion token; ValueError if it is
    malformed or was not signed with `key`."""
    payload, dot, mac = token.rpartition(".")
    if not dot or not hmac.compare_digest(mac, _token_mac(key, payload)):
        raise ValueError("completion token not issued by this deployment")
    saga_id, step = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    if not isinstance(saga_id, str) or not isinstance(step, str):
        raise ValueError("malformed completion token")
    return saga_id, step


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _token_mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest()[:16])
