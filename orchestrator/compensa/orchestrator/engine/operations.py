"""Operator actions on a saga, as the machine's events: one definition for
every face that offers them (the gRPC API, the dashboard)."""

from __future__ import annotations

from compensa.orchestrator.engine import machine
from compensa.orchestrator.shared.errors import InvalidArgument
from compensa.orchestrator.shared.limits import MAX_STORED_ACTOR_CHARS, check_text, stored_text

__all__ = ["OPERATOR_ACTIONS", "operator_event"]

#: The actions, by RPC name.
OPERATOR_ACTIONS = ("CancelSaga", "RetrySaga", "ResolveSaga")


def operator_event(action: str, actor: str, text: str) -> machine.Event:
    """The event for `action`, by `actor`; `text` is the reason (cancel,
    retry) or the note (resolve, required). InvalidArgument if the text
    cannot be stored; the actor (who the caller's credentials name) is cut
    to what the log keeps."""
    check_text(text, "note" if action == "ResolveSaga" else "reason")
    actor = stored_text(actor, MAX_STORED_ACTOR_CHARS)
    if action == "CancelSaga":
        return machine.CancelRequested(actor=actor, reason=text)
    if action == "RetrySaga":
        return machine.RetryRequested(actor=actor, reason=text)
    if action == "ResolveSaga":
        if not text.strip():
            raise InvalidArgument("note is required: say what was done to repair the flow")
        return machine.ResolveRequested(actor=actor, note=text)
    raise ValueError(f"not an operator action: {action}")
