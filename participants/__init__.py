"""The participant SDK, and the checkout example participants built on it.

What a participant of your own needs is here:

    from participants import Participant, StepFailed, create_participant_engine, serve

`Participant` and its errors come from `participants.sdk`, serving from
`participants.serving`, and `participants.testing` runs a real orchestrator
against your servicer in your tests. The names are loaded on first use, so
that importing a small module of this package (`participants.tls`) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from participants.sdk import (
        CompleteStep,
        DeadlinePassed,
        NotCompensable,
        NotLongRunning,
        Participant,
        ParticipantError,
        Pending,
        StepFailed,
        TransientError,
        insert_if_absent,
        pack,
        unpack_as,
    )
    from participants.serving import RunningParticipant, create_participant_engine, serve, start_server
    from participants.startup import AddressInUse, DatabaseMisconfigured, ServingError

_HOMES = {
    **dict.fromkeys(
        (
            "CompleteStep", "DeadlinePassed", "NotCompensable", "NotLongRunning", "Participant", "ParticipantError", "Pending",
            "StepFailed", "TransientError", "insert_if_absent", "pack", "unpack_as",
        ),
        "participants.sdk",
    ),
    **dict.fromkeys(("RunningParticipant", "create_participant_engine", "serve", "start_server"), "participants.serving"),
    **dict.fromkeys(("AddressInUse", "DatabaseMisconfigured", "ServingError"), "participants.startup"),
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'participants' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
