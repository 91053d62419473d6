"""Seconds since the epoch (how the engine and the store keep time) as
protobuf Timestamps (how the participant and client APIs carry it)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """`seconds` as a Timestamp; None stays None (an unset field)."""
    if seconds is None:
        return None
    whole = int(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))
