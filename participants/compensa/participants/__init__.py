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
    from compensa.common.startup import (
        AddressInUse as AddressInUse,
    )
    from compensa.common.startup import (
        DatabaseMisconfigured as DatabaseMisconfigured,
    )
    from compensa.common.startup import (
        ServingError as ServingError,
    )
    from compensa.participants.sdk import (
        CompleteStep as CompleteStep,
    )
    from compensa.participants.sdk import (
        DeadlinePassed as DeadlinePassed,
    )
    from compensa.participants.sdk import (
        NotCompensable as NotCompensable,
    )
    from compensa.participants.sdk import (
        NotLongRunning as NotLongRunning,
    )
    from compensa.participants.sdk import (
        Participant as Participant,
    )
    from compensa.participants.sdk import (
        ParticipantError as ParticipantError,
    )
    from compensa.participants.sdk import (
        Pending as Pending,
    )
    from compensa.participants.sdk import (
        StepFailed as StepFailed,
    )
    from compensa.participants.sdk import (
        TransientError as TransientError,
    )
    from compensa.participants.sdk import (
        WrongOutputType as WrongOutputType,
    )
    from compensa.participants.sdk import (
        insert_if_absent as insert_if_absent,
    )
    from compensa.participants.sdk import (
        pack as pack,
    )
    from compensa.participants.sdk import (
        unpack_as as unpack_as,
    )
    from compensa.participants.serving import (
        RunningParticipant as RunningParticipant,
    )
    from compensa.participants.serving import (
        create_participant_engine as create_participant_engine,
    )
    from compensa.participants.serving import (
        serve as serve,
    )
    from compensa.participants.serving import (
        start_server as start_server,
    )

_HOMES = {
    **dict.fromkeys(
        (
            "CompleteStep", "DeadlinePassed", "NotCompensable", "NotLongRunning", "Participant", "ParticipantError",
            "Pending", "StepFailed", "TransientError", "WrongOutputType", "insert_if_absent", "pack", "unpack_as",
        ),
        "compensa.participants.sdk",
    ),
    **dict.fromkeys(
        ("RunningParticipant", "create_participant_engine", "serve", "start_server"), "compensa.participants.serving"
    ),
    **dict.fromkeys(("AddressInUse", "DatabaseMisconfigured", "ServingError"), "compensa.common.startup"),
}

__all__ = sorted(_HOMES)


def __dir__() -> list[str]:
    """The lazy names too, for dir(), completion in a shell and IDEs."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'participants' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
