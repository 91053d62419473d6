"""Whether a saga in flight could move to another version of its definition.

A saga is COMPATIBLE with a new definition when every decision already taken
is one the new definition would have taken too: its history replays under the
new definition without a divergence (the same steps run, in an order the new
one allows, no pivot moved before a step already done) and no step that ran
was removed or changed in participant or compensability. Steps renamed in
the new definition are given as a mapping old -> new; a saga that needs one
is COMPATIBLE_WITH_MAPPING. Anything else is INCOMPATIBLE, with the first
diverging event and the reason. Pure: nothing here reads or writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.replay import replay_history
from compensa.orchestrator.shared.errors import InvalidArgument, quote
from compensa.orchestrator.shared.records import ACTIVE_SAGA_STATES
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.v1 import bulk_pb2, definition_pb2, orchestrator_pb2

__all__ = ["check_step_mappings", "classify"]

COMPATIBLE = orchestrator_pb2.MIGRATION_VERDICT_COMPATIBLE
COMPATIBLE_WITH_MAPPING = orchestrator_pb2.MIGRATION_VERDICT_COMPATIBLE_WITH_MAPPING
INCOMPATIBLE = orchestrator_pb2.MIGRATION_VERDICT_INCOMPATIBLE


def check_step_mappings(
    mappings: Sequence[bulk_pb2.StepMapping],
    old_versions: Sequence[definition_pb2.SagaDefinition],
    new: definition_pb2.SagaDefinition,
) -> dict[str, str]:
    """The mappings as old name -> new name; InvalidArgument naming the first
    one whose old step is in none of `old_versions` or whose new step is not
    in `new`, or that maps a step twice."""
    old_steps = {step.name for version in old_versions for step in version.steps}
    new_steps = {step.name for step in new.steps}
    versions = ", ".join(str(version.version) for version in old_versions)
    renames: dict[str, str] = {}
    for index, mapping in enumerate(mappings):
        field = f"step_mappings[{index}]"
        if mapping.old_step not in old_steps:
            raise InvalidArgument(
                f"{field}.old_step {quote(mapping.old_step)} is not a step of {new.name} version(s) {versions}"
            )
        if mapping.new_step not in new_steps:
            raise InvalidArgument(
                f"{field}.new_step {quote(mapping.new_step)} is not a step of the new definition "
                f"(its steps: {', '.join(sorted(new_steps))})"
            )
        if mapping.old_step in renames:
            raise InvalidArgument(f"{field} maps step {quote(mapping.old_step)} a second time")
        renames[mapping.old_step] = mapping.new_step
    return renames


def classify(
    history: orchestrator_pb2.SagaHistory,
    new: definition_pb2.SagaDefinition | machine.Plan,
    renames: Mapping[str, str],
) -> orchestrator_pb2.SagaMigrationPlan:
    """The plan for one saga: its history replayed under `new` (validated and
    normalized, or its plan) with its steps renamed by `renames`."""
    saga = history.saga
    plan = orchestrator_pb2.SagaMigrationPlan(
        saga_id=saga.saga_id, definition_version=saga.definition_version, state=saga.state
    )
    if saga.state not in ACTIVE_SAGA_STATES:
        plan.verdict = INCOMPATIBLE
        plan.reason = f"the saga is {saga_state_name(saga.state)}: only a saga in flight moves to another version"
        return plan
    outcome = replay_history(history, new, renames=renames)
    if outcome.divergence is not None:
        plan.verdict = INCOMPATIBLE
        plan.diverging_sequence = outcome.divergence.sequence
        plan.reason = outcome.divergence.reason
        return plan
    ran = {event.step_name for event in history.events if event.step_name}
    used = {old: new_name for old, new_name in renames.items() if old in ran and old != new_name}
    if used:
        plan.verdict = COMPATIBLE_WITH_MAPPING
        plan.reason = "with " + ", ".join(f"{old}={new_name}" for old, new_name in sorted(used.items()))
    else:
        plan.verdict = COMPATIBLE
    return plan
