"""The participant SDK, and the checkout example participants built on it.

What a participant of your own needs is here:

    from compensa.participants import Participant, StepFailed, create_participant_engine, serve

`Participant` and its errors come from `compensa.participants.sdk`, serving from
`compensa.participants.serving`, and `compensa.testing` runs a real orchestrator
against your servicer in your tests. The names are loaded on first use, so
that importing a small module of this package (`compensa.common.tls`) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compensa.participants.sdk import (
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
    from compensa.participants.serving import RunningParticipant, create_participant_engine, serve, start_server
    from compensa.common.startup import AddressInUse, DatabaseMisconfigured, ServingError

_HOMES = {
    **dict.fromkeys(
        (
            "CompleteStep", "DeadlinePassed", "NotCompensable", "NotLongRunning", "Participant", "ParticipantError", "Pending",
            "StepFailed", "TransientError", "insert_if_absent", "pack", "unpack_as",
        ),
        "compensa.participants.sdk",
    ),
    **dict.fromkeys(("RunningParticipant", "create_participant_engine", "serve", "start_server"), "compensa.participants.serving"),
    **dict.fromkeys(("AddressInUse", "DatabaseMisconfigured", "ServingError"), "compensa.common.startup"),
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'participants' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
